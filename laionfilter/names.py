"""Names that come from files (users, profiles, tasks): one rule, checked where a name enters.

A name becomes a file name (``<user>.profile``, ``guidance/<profile>/``) and a DuckDB column, so it must
be a plain name: letters (any script), digits, ``_``, ``-`` and ``.``, starting with a letter or digit
and not ending with ``.``, at most 128 bytes in the file system's encoding (file systems count bytes, at
most 255, and a name gains suffixes and temporary prefixes; ``é`` is two bytes in UTF-8, ``花`` three).
Anything else is refused rather than cleaned up, because a cleaned name can
collide with another (``x/y`` and ``x_y``) or lose letters (``zoë``). Names are compared after Unicode
NFC normalisation and case folding, since DuckDB columns and many file systems ignore case.
"""

from __future__ import annotations

import os
import re
import sys
import unicodedata
from pathlib import Path
from typing import Iterable

from .errors import LaionfilterError

MAX_BYTES = 128
_PLAIN = re.compile(r"[^\W_](?:[\w.\-]*[\w\-])?")  # \w is Unicode-aware: zoë and 花子 are plain names


def _fs_bytes(name: str) -> int:
    return len(unicodedata.normalize("NFC", name).encode(sys.getfilesystemencoding(), "replace"))


def is_plain_name(name: object) -> bool:
    return isinstance(name, str) and _PLAIN.fullmatch(name) is not None and _fs_bytes(name) <= MAX_BYTES


def check_name(name: object, what: str = "name", where: str | os.PathLike | None = None) -> str:
    """The name, NFC-normalised, or a one-line error naming where it came from."""
    text = unicodedata.normalize("NFC", str(name)) if isinstance(name, str) else name
    if not isinstance(text, str) or not is_plain_name(text):
        prefix = f"{where}: " if where else ""
        size = _fs_bytes(text) if isinstance(text, str) else 0
        raise LaionfilterError(
            f"{prefix}{what} {name!r} is not a plain name: use letters, digits, '_', '-' and '.' "
            f"(not first or last), at most {MAX_BYTES} bytes in the file system's encoding"
            + (f" ({size} here)" if size > MAX_BYTES else ""))
    return text


def name_key(name: str) -> str:
    """What two names must differ in: DuckDB columns and many file systems ignore case."""
    return unicodedata.normalize("NFC", name).casefold()


def check_distinct(names: Iterable[str], what: str = "names", where: str | os.PathLike | None = None) -> None:
    """Refuse names that would land on the same file or column."""
    seen: dict[str, str] = {}
    for n in names:
        k = name_key(n)
        if k in seen:
            prefix = f"{where}: " if where else ""
            same = f"{seen[k]!r} and {n!r}" if seen[k] != n else f"{n!r} twice"
            raise LaionfilterError(f"{prefix}{what} collide: {same} would write the same file or column")
        seen[k] = n


def child_path(parent: str | os.PathLike, name: str, suffix: str = "", what: str = "name") -> Path:
    """``parent/<name><suffix>``, refusing a name that is not plain or a result that leaves ``parent``."""
    check_name(name, what)
    parent = Path(parent)
    path = parent / f"{name}{suffix}"
    if os.path.commonpath([parent.resolve(), path.resolve()]) != str(parent.resolve()):
        raise LaionfilterError(f"{what} {name!r} would write outside {parent}")
    return path
