"""DuckDB over a scores folder: ad-hoc SQL, and user-specific subsets ready for img2dataset.

Paths and values are bound as parameters or passed through DuckDB's Python API, never pasted into SQL
text. Identifiers (profile columns) are checked against the folder's columns and quoted. A ``--where``
condition is SQL by design: it is the user's own filter over their own data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import LaionfilterError
from .writer import FIXED_COLUMNS

JOIN_KEYS = {"key": ("key", ["key"]), "url": ("url", ["url", "URL"])}


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def connect(scores: str | os.PathLike, join: str | os.PathLike | None = None) -> duckdb.DuckDBPyConnection:
    """A connection with the view ``scores`` (every part file of the folder) and ``meta`` (``join``)."""
    scores = Path(scores)
    parts = sorted(scores.glob("*.parquet")) if scores.is_dir() else [scores]
    if not scores.exists():
        raise LaionfilterError(f"{scores}: no such scores folder or file")
    if not parts:
        raise LaionfilterError(f"{scores}: no Parquet part files in it (has `laionfilter score` run?)")
    con = duckdb.connect()
    con.read_parquet([str(p) for p in parts], union_by_name=True).create_view("scores")
    if join:
        j = Path(join)
        if not j.exists():
            raise LaionfilterError(f"{j}: no such metadata file or folder")
        files = sorted(j.glob("*.parquet")) if j.is_dir() else [j]
        con.read_parquet([str(f) for f in files], union_by_name=True).create_view("meta")
    return con


def columns(con: duckdb.DuckDBPyConnection, view: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()]


def profile_columns(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [c for c in columns(con, "scores") if c not in FIXED_COLUMNS]


def require_profile(con: duckdb.DuckDBPyConnection, profile: str, scores) -> None:
    names = profile_columns(con)
    if profile not in names:
        raise LaionfilterError(f"{scores}: no scores for profile {profile!r}; it has {', '.join(map(repr, names)) or 'none'}")


def run_sql(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> pa.Table:
    try:
        rel = con.sql(sql, params=params or None)
        if rel is None:  # a statement without a result (CREATE, SET, ...)
            return pa.table({})
        return rel.to_arrow_table()
    except duckdb.Error as e:
        raise LaionfilterError(f"SQL error: {str(e).splitlines()[0]}") from None


def query(scores, sql: str, join=None) -> pa.Table:
    """Run SQL with the views ``scores`` (and ``meta``) defined."""
    return run_sql(connect(scores, join), sql)


def select(scores, profile: str, *, top: int | None = None, min_score: float | None = None,
           percentile: float | None = None, where: str | None = None, join=None, on: str = "key",
           all_statuses: bool = False) -> pa.Table:
    """A user's subset: url, caption, key, shard, score and any joined metadata, best first."""
    con = connect(scores, join)
    require_profile(con, profile, scores)
    ours = columns(con, "scores")
    inner_cols = [f"s.{quote(c)}" for c in ours]
    out_cols = ["url", "caption", "key", "shard", "score"]
    joined = ""
    if join:
        if on not in JOIN_KEYS:
            raise LaionfilterError(f"--on {on!r}: use one of {', '.join(JOIN_KEYS)}")
        mine, candidates = JOIN_KEYS[on]
        meta_cols = columns(con, "meta")
        theirs = next((c for c in candidates if c in meta_cols), None)
        if theirs is None:
            raise LaionfilterError(f"{join}: no column {' or '.join(candidates)} to join on")
        joined = f" JOIN meta m ON s.{mine} = m.{quote(theirs)}"
        # Metadata wins for names both sides have (LAION's WIDTH is the original image's), except the
        # subset's own columns, which the metadata's copies get a meta_ prefix beside.
        keep = {"url", "caption", "key", "shard", "score", "status"}
        meta_lower = {c.lower() for c in meta_cols}
        inner_cols = [f"s.{quote(c)}" for c in ours if c in keep or c.lower() not in meta_lower]
        for c in meta_cols:
            name = f"meta_{c}" if c.lower() in keep else c
            inner_cols.append(f"m.{quote(c)} AS {quote(name)}")
            out_cols.append(name)
    conds, params = [], []
    if not all_statuses:
        conds.append("status = 'ok'")
    conds.append("score IS NOT NULL")
    if min_score is not None:
        conds.append("score >= ?")
        params.append(min_score)
    if percentile is not None:
        if not 0 <= percentile <= 100:
            raise LaionfilterError(f"--percentile {percentile}: must be between 0 and 100")
        ok = "status = 'ok' AND " if not all_statuses else ""
        conds.append(f"score >= (SELECT quantile_cont({quote(profile)}, ?) FROM scores WHERE {ok}{quote(profile)} IS NOT NULL)")
        params.append(percentile / 100)
    if where:
        conds.append(f"({where})")
    inner = f"SELECT {', '.join(inner_cols)}, s.{quote(profile)} AS score FROM scores s{joined}"
    sql = (f"SELECT {', '.join(quote(c) for c in out_cols)} FROM ({inner}) "
           f"WHERE {' AND '.join(conds)} ORDER BY score DESC, key")
    if top is not None:
        sql += " LIMIT ?"
        params.append(int(top))
    return run_sql(con, sql, params)


def write_table(table: pa.Table, out: str | os.PathLike) -> Path:
    """Parquet, or CSV when the name ends in .csv; written whole, then renamed into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if out.suffix.lower() == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, tmp)
    else:
        pq.write_table(table, tmp)
    os.replace(tmp, out)
    return out
