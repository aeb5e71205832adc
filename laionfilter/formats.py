"""The file formats, in one place: their format tags, and validation against the JSON schemas shipped
in ``laionfilter/schemas/`` (the reference for anyone reading or writing these files).

Every manifest or metadata block read from disk is validated before it is used, so a malformed file is a
one-line error naming the file and the field, never a ``KeyError`` deep inside.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from .errors import LaionfilterError

TASK_FORMAT = "laionfilter.task/1"
BANK_FORMAT = "laionfilter.bank/1"
PROFILE_FORMAT = "laionfilter.profile/1"
SCORES_FORMAT = "laionfilter.scores/1"
BASE_FORMAT = "laionfilter.base/1"  # the starter builder's pretrained θ_pre

SCHEMA_DIR = Path(__file__).parent / "schemas"
SCHEMAS = {TASK_FORMAT: "task.schema.json", BANK_FORMAT: "bank-manifest.schema.json",
           PROFILE_FORMAT: "profile.schema.json", SCORES_FORMAT: "scores-manifest.schema.json"}


@functools.cache
def _validator(schema_file: str):
    import jsonschema
    from referencing import Registry, Resource

    schemas = [json.loads(p.read_text()) for p in SCHEMA_DIR.glob("*.schema.json")]
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas)
    schema = json.loads((SCHEMA_DIR / schema_file).read_text())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(obj: Any, fmt: str, where: str | os.PathLike) -> dict[str, Any]:
    """``obj`` if it is a valid ``fmt`` document, else a one-line error naming ``where`` and the field."""
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise LaionfilterError(f"{where}: not a {fmt} file (format {found!r})")
    error = next(iter(sorted(_validator(SCHEMAS[fmt]).iter_errors(obj), key=lambda e: list(e.path))), None)
    if error is not None:
        field = "/".join(map(str, error.absolute_path)) or "(top level)"
        raise LaionfilterError(f"{where}: malformed {fmt} metadata at {field}: {error.message[:200]}")
    return obj
