"""Where a client can load the served model and its tokenizer from (/get_model_info).

SGLang's clients (its frontend, bench_serving) load a tokenizer from `tokenizer_path` with
transformers' AutoTokenizer. A HF model directory serves as it is; a GGUF file holds its
tokenizer inside, so the server writes it out once, to a temporary directory that lives as
long as the server.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

from sageserve.models.default_model import resolve_model_path

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class ModelFiles:
    """model_path: the file or directory `--model-path` loads (absolute when it exists);
    tokenizer_path(): a directory AutoTokenizer.from_pretrained loads."""

    def __init__(self, model_path: str, tokenizer: Any) -> None:
        resolved = Path(resolve_model_path(model_path))
        self.model_path = str(resolved.resolve()) if resolved.exists() else model_path
        self._resolved = resolved
        self._tokenizer = tokenizer
        self._saved: tempfile.TemporaryDirectory[str] | None = None
        self._lock = threading.Lock()

    def tokenizer_path(self) -> str | None:
        """None when the model has no tokenizer (token ids only)."""
        folder = self._resolved
        if folder.is_dir() and any((folder / f).is_file() for f in _TOKENIZER_FILES):
            return self.model_path
        if self._tokenizer is None:
            return None
        with self._lock:
            if self._saved is None:
                self._saved = tempfile.TemporaryDirectory(prefix="sageserve-tokenizer-")
                self._tokenizer.save_pretrained(self._saved.name)
        return self._saved.name

    def close(self) -> None:
        """Remove a tokenizer written out (at server shutdown)."""
        if self._saved is not None:
            self._saved.cleanup()
