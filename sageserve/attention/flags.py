"""A backend's own launch options, and the command-line flags that set them.

Each backend package defines one frozen dataclass deriving from `BackendFlags` and registers
it with `registry.register_backend`; the engine's argument parser then adds its flags, and
the engine hands the parsed value to the backend as `BackendOptions.flags`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Self


@dataclass(frozen=True)
class BackendFlags:
    """No options: the base for a backend that has none. Subclasses validate in
    `__post_init__` (ValueError naming the valid choices)."""

    @classmethod
    def add_cli_flags(cls, group: argparse._ArgumentGroup) -> None:
        """Add this backend's flags (named after the backend, e.g. --sage-pv) to `group`."""

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> Self:
        """The options the flags added by `add_cli_flags` parsed into."""
        return cls()

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> Self:
        """Options from field names (the offline API); ValueError naming the valid fields."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            valid = ", ".join(sorted(fields)) or "none"
            raise ValueError(f"unknown options {unknown} for this backend; valid options: {valid}")
        return cls(**kwargs)
