"""Reading the user's tables (CSV, TSV or Parquet) into pyarrow, with errors naming the file, and
writing the CSVs a user goes on to edit (``rate``'s answers, ``suggest``'s picks)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .errors import LaionfilterError


# Columns that hold names, never numbers: a sample key such as 000000012 must keep its zeros.
TEXT_COLUMNS = ("image", "user", "key", "shard", "url", "caption", "split")


def read_table(path: str | os.PathLike) -> pa.Table:
    """A CSV (``.csv``), TSV (``.tsv``/``.tab``) or Parquet (``.parquet``/``.pq``) file as a table."""
    path = Path(path)
    if not path.exists():
        raise LaionfilterError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq") or path.is_dir():
            return pq.read_table(path)
        if suffix in (".csv", ".tsv", ".tab", ".txt"):
            _check_utf8(path)
            delimiter = "\t" if suffix in (".tsv", ".tab") else ","
            # Strings stay strings: a column of paths must never be parsed into numbers or dates.
            return pacsv.read_csv(
                path,
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=False, auto_dict_encode=False,
                                                     column_types={c: pa.string() for c in TEXT_COLUMNS}),
            )
    except (pa.ArrowInvalid, OSError) as e:
        raise LaionfilterError(f"{path}: cannot read it as a table ({e})") from None
    raise LaionfilterError(f"{path}: unknown table format {suffix!r} (use .csv, .tsv or .parquet)")


def _check_utf8(path: Path) -> None:
    """Refuse UTF-16 and UTF-32 text (what Windows tools call "Unicode") with a hint, not a parse error."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\0" in head:
        raise LaionfilterError(f"{path}: the text looks UTF-16 or UTF-32 encoded (it has zero bytes); save it as "
                               "UTF-8 (in Excel: CSV UTF-8; or iconv -f UTF-16 -t UTF-8)")


def require_columns(table: pa.Table, columns: list[str], path: str | os.PathLike) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        hint = ""
        if len(table.column_names) == 1:
            sep = next((d for d in (";", "\t", "|") if d in table.column_names[0]), None)
            if sep:
                hint = (f" (the header looks {'tab' if sep == chr(9) else repr(sep)}-separated: "
                        f"{'name the file .tsv' if sep == chr(9) else 'use commas'})")
        raise LaionfilterError(
            f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"it has {', '.join(repr(c) for c in table.column_names)}{hint}"
        )


def resolve_path(value: str, base: Path) -> Path:
    """A path from a table: absolute, or relative to the table's folder."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def answers_writer(f: TextIO) -> Any:
    """A ``csv.writer`` with LF line ends, as files written by hand have (csv's default is CRLF), so
    that rows appended to a user's own file match it and cut/awk see no \\r."""
    return csv.writer(f, lineterminator="\n")
