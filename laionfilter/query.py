"""DuckDB over a scores folder: ad-hoc SQL, and user-specific subsets ready for img2dataset.

SQL from the command line runs on a connection that can touch nothing but the data given. The scores
(and ``--join``) files are opened by pyarrow and registered as the views ``scores`` and ``meta``; then
DuckDB's ``enable_external_access`` is switched off and its configuration locked, so no statement can
read another file, write one (``COPY ... TO``), attach a database or install or load an extension.
Results are written by pyarrow to ``--out``. ``query --unsafe`` opts out, for a user's own trusted SQL.
A ``--where`` condition is parsed as one SQL expression (DuckDB's own parser), never pasted as text.
Values are bound as parameters; identifiers (profile columns) are checked and quoted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import LaionfilterError
from .log import note
from .names import check_distinct, check_name
from .safefiles import atomic_write
from .tables import read_table
from .writer import FIXED_COLUMNS, rating_column

JOIN_KEYS = {"key": ("key", ["key"]), "url": ("url", ["url", "URL"])}


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _parquet_files(path: Path, what: str) -> list[Path]:
    if not path.exists():
        raise LaionfilterError(f"{path}: no such {what}")
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise LaionfilterError(f"{path}: no Parquet files in it" + (" (has `laionfilter score` run?)" if what.startswith("scores") else ""))
    return files


def _dataset(path: Path, what: str):
    """The files as one lazily read pyarrow dataset (a CSV/TSV join table is read whole). Column names
    that differ only in case are refused: DuckDB would rename one (``bob`` to ``bob_1``)."""
    import pyarrow.dataset as pds

    if path.is_file() and path.suffix.lower() in (".csv", ".tsv", ".tab"):
        data = read_table(path)
    else:
        files = _parquet_files(path, what)
        try:
            schema = pa.unify_schemas([pq.read_schema(f) for f in files])
            data = pds.dataset([str(f) for f in files], schema=schema, format="parquet")
        except (pa.ArrowInvalid, OSError) as e:
            bad = next((f for f in files if not _is_parquet(f)), files[0])
            raise LaionfilterError(f"{bad}: cannot read it as Parquet ({str(e).splitlines()[0]})") from None
    check_distinct(data.schema.names, "columns", path)
    return data


def _is_parquet(path: Path) -> bool:
    try:
        pq.read_schema(path)
        return True
    except (pa.ArrowInvalid, OSError):
        return False


def connect(scores: str | os.PathLike, join: str | os.PathLike | None = None,
            unsafe: bool = False) -> duckdb.DuckDBPyConnection:
    """A connection with the view ``scores`` (every part file of the folder) and ``meta`` (``join``).

    Unless ``unsafe``, the connection can read nothing else and write nothing at all.
    """
    con = duckdb.connect()
    views = {"scores": _dataset(Path(scores), "scores folder or file")}
    if join:
        views["meta"] = _dataset(Path(join), "metadata file or folder")
    for name, data in views.items():
        con.register(name, data)
    if not unsafe:
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


def columns(con: duckdb.DuckDBPyConnection, view: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()]


def profile_columns(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The score columns: neither fixed nor a profile's rating column."""
    cols = columns(con, "scores")
    ratings = {rating_column(c) for c in cols}
    return [c for c in cols if c not in FIXED_COLUMNS and c not in ratings]


def require_profile(con: duckdb.DuckDBPyConnection, profile: str, scores) -> None:
    check_name(profile, "profile")
    names = profile_columns(con)
    if profile not in names:
        raise LaionfilterError(f"{scores}: no scores for profile {profile!r}; it has {', '.join(map(repr, names)) or 'none'}")


def run_sql(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> pa.Table:
    try:
        rel = con.sql(sql, params=params or None)
        if rel is None:  # a statement without a result (CREATE, SET, ...)
            return pa.table({})
        return rel.to_arrow_table()
    except duckdb.PermissionException as e:
        raise LaionfilterError(f"SQL error: {str(e).splitlines()[0]} (SQL here sees only the views scores and meta; "
                               "write results with --out)") from None
    except duckdb.Error as e:
        raise LaionfilterError(f"SQL error: {str(e).splitlines()[0]}") from None


def query(scores, sql: str, join=None, unsafe: bool = False) -> pa.Table:
    """Run SQL with the views ``scores`` (and ``meta``) defined; ``unsafe`` lifts the file lock-down."""
    return run_sql(connect(scores, join, unsafe=unsafe), sql)


def where_expression(where: str) -> str:
    """``--where`` as one parsed SQL expression: a fragment that closes its parentheses or adds a
    statement is refused."""
    try:
        return str(duckdb.SQLExpression(where))
    except duckdb.Error as e:
        raise LaionfilterError(f"--where {where!r} is not one SQL expression ({str(e).splitlines()[0]})") from None


def select(scores, profile: str, *, top: int | None = None, min_score: float | None = None,
           percentile: float | None = None, where: str | None = None, join=None, on: str = "key",
           all_statuses: bool = False, min_rating: float | None = None) -> pa.Table:
    """A user's subset: url, caption, key, shard, score (and rating, on the user's own scale, where the
    profile is calibrated) and any joined metadata, best first."""
    con = connect(scores, join)
    require_profile(con, profile, scores)
    ours = columns(con, "scores")
    rated = rating_column(profile) in ours
    if min_rating is not None and not rated:
        raise LaionfilterError(f"{scores}: --min-rating needs the column {rating_column(profile)!r}, which a "
                               f"calibrated profile adds; {profile!r} was learned from pairs or before "
                               "calibration: learn it again from rated images and score again")
    # A profile named score or rating still comes out as score (rating); the outer query picks by name.
    ours = [c for c in ours if c.lower() not in ("score", "rating")]
    inner_cols = [f"s.{quote(c)}" for c in ours]
    out_cols = ["url", "caption", "key", "shard", "score"] + (["rating"] if rated else [])
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
        keep = {"url", "caption", "key", "shard", "score", "rating", "status"}
        meta_lower = {c.lower() for c in meta_cols}
        inner_cols = [f"s.{quote(c)}" for c in ours if c in keep or c.lower() not in meta_lower]
        for c in meta_cols:
            name = f"meta_{c}" if c.lower() in keep else c
            inner_cols.append(f"m.{quote(c)} AS {quote(name)}")
            out_cols.append(name)
    ok_rows = "TRUE" if all_statuses else "status = 'ok'"  # the rows that count, here and for the thresholds
    conds, params = [ok_rows, "score IS NOT NULL"], []
    if min_score is not None:
        conds.append("score >= ?")
        params.append(min_score)
    if min_rating is not None:
        conds.append("rating >= ?")
        params.append(min_rating)
    if percentile is not None:
        if not 0 <= percentile <= 100:
            raise LaionfilterError(f"--percentile {percentile}: must be between 0 and 100")
        conds.append(f"score >= (SELECT quantile_cont({quote(profile)}, ?) FROM scores "
                     f"WHERE {ok_rows} AND {quote(profile)} IS NOT NULL)")
        params.append(percentile / 100)
    if where:
        conds.append(f"({where_expression(where)})")
    rating = f", s.{quote(rating_column(profile))} AS rating" if rated else ""
    inner = f"SELECT {', '.join(inner_cols)}, s.{quote(profile)} AS score{rating} FROM scores s{joined}"
    sql = (f"SELECT {', '.join(quote(c) for c in out_cols)} FROM ({inner}) "
           f"WHERE {' AND '.join(conds)} ORDER BY score DESC, key")
    if top is not None:
        sql += " LIMIT ?"
        params.append(int(top))
    subset = run_sql(con, sql, params)
    if subset.num_rows == 0 and (min_score is not None or min_rating is not None):
        # An empty subset from a threshold is most often a threshold past what the scores reach (a
        # rating of 8 from a user who rates 1–5): say how far they go.
        best = [("score", profile)] + ([("rating", rating_column(profile))] if rated else [])
        maxima = ", ".join(f"max({quote(c)})" for _, c in best)
        highest = run_sql(con, f"SELECT {maxima} FROM scores WHERE {ok_rows}").to_pylist()[0]
        note(f"{scores}: no image of {profile!r} passes the thresholds; "
             + ", ".join(f"the highest {what} is {v:.4g}" for (what, _), v in zip(best, highest.values()) if v is not None))
    return subset


def write_table(table: pa.Table, out: str | os.PathLike) -> Path:
    """Parquet, or CSV when the name ends in .csv; written whole, then renamed into place."""
    out = Path(out)
    with atomic_write(out) as tmp:
        if out.suffix.lower() == ".csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, tmp)
        else:
            pq.write_table(table, tmp)
    return out
