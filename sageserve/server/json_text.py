"""What a JSON body can carry that the parser takes but the server must not.

JSON's `\\ud800` escape decodes to a lone UTF-16 surrogate: a Python str that no tokenizer
can encode and no response can be written as UTF-8. And deep nesting makes the parser
recurse until Python's recursion limit. Both are the client's mistake (a 400), found here
before any route parses the body; a body without a surrogate escape and with few brackets
is not parsed at all.
"""

from __future__ import annotations

import json
import re
from typing import Any

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
# Below this many opening brackets the parser cannot reach Python's recursion limit.
_BRACKETS_BEFORE_DEPTH_CHECK = 500


def json_body_problem(body: bytes) -> str | None:
    """Why `body` must be refused (a message naming the field), or None.

    Malformed JSON is left to the route, whose 400 names the parse error.
    """
    suspicious = _SURROGATE_ESCAPE.search(body) or (
        body.count(b"[") + body.count(b"{") > _BRACKETS_BEFORE_DEPTH_CHECK
    )
    if not suspicious:
        return None
    try:
        path = _lone_surrogate_path(json.loads(body), "body")
    except RecursionError:
        return "the JSON body is nested too deeply"
    except ValueError:
        return None
    if path is None:
        return None
    return f"{path} contains a lone UTF-16 surrogate escape (\\ud800-\\udfff): not valid text"


def _lone_surrogate_path(value: Any, path: str) -> str | None:
    """The path of the first string (or key) holding a lone surrogate, or None."""
    if isinstance(value, str):
        return path if _has_surrogate(value) else None
    if isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    elif isinstance(value, dict):
        for key in value:
            if _has_surrogate(key):
                return f"{path}: a key"
        items = ((f"{path}.{k}", v) for k, v in value.items())
    else:
        return None
    return next((p for p in (_lone_surrogate_path(v, sub) for sub, v in items) if p), None)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
