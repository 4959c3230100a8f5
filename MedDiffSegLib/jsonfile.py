"""Reading the project's small JSON files (model cards, dataset descriptions, result summaries)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import MedDiffSegError


def read_json_object(path: str | os.PathLike, error: type[MedDiffSegError], *, shown: str | None = None,
                     encoding: str = "utf-8") -> dict:
    """The JSON object in ``path``, or ``error`` (a :class:`MedDiffSegError` subclass) saying why not.

    ``shown`` is how the path appears in the message (default: as given). No I/O error, encoding
    error, syntax error or non-object document escapes as anything but ``error``.
    """
    shown = shown if shown is not None else os.fspath(path)
    try:
        data = json.loads(Path(path).read_text(encoding=encoding))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read {shown}: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{shown} must hold a JSON object")
    return data
