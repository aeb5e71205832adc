"""Diffusion guidance sets from a user's scores: exemplars, negatives and preference pairs.

For each profile, in ``OUT/<profile>/``:
- ``exemplars.parquet``: the top-K images (url, caption, key, shard, score), a fine-tuning or prompt set;
- ``negatives.parquet``: the bottom-K, for negative guidance;
- ``pairs.parquet``: preference pairs in the layout Diffusion-DPO style code reads (one row per pair):
  ``caption`` (the prompt: the chosen image's caption), ``url_0``/``key_0``/``score_0`` for the chosen
  image, ``url_1``/``key_1``/``score_1`` for the rejected one, ``label_0`` = 1 (image 0 preferred),
  ``margin`` (score_0 − score_1, at least ``--margin``), and ``group`` (the grouping value, if any).
Pairs are drawn without a full cross join: rows are shuffled (seeded) within their group and each is
paired with its next few neighbours in that order, so the cost stays linear in the number of rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import LaionfilterError
from .names import child_path
from .query import columns, connect, profile_columns, quote, require_profile, run_sql, write_table

NEIGHBOURS = 8


def guidance_sets(scores, out: str | os.PathLike, profiles: list[str] | None = None, *, top: int = 1000,
                  bottom: int = 1000, pairs: int = 10000, margin: float = 1.0, group_by: str | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """Write exemplars, negatives and pairs per profile; returns their row counts."""
    con = connect(scores)
    names = profiles or profile_columns(con)
    for p in names:
        require_profile(con, p, scores)
    if group_by and group_by not in columns(con, "scores"):
        raise LaionfilterError(f"{scores}: no column {group_by!r} to group pairs by")
    if margin < 0:
        raise LaionfilterError("--margin must be ≥ 0")
    out = Path(out)
    report: dict[str, Any] = {}
    for p in names:
        col = quote(p)
        ok = f"status = 'ok' AND {col} IS NOT NULL"
        base = f"SELECT url, caption, key, shard, {col} AS score FROM scores WHERE {ok}"
        ex = run_sql(con, f"{base} ORDER BY score DESC, key LIMIT ?", [top])
        neg = run_sql(con, f"{base} ORDER BY score ASC, key LIMIT ?", [bottom])
        grp = quote(group_by) if group_by else "NULL"
        pair_sql = f"""
            WITH ranked AS (
                SELECT url, caption, key, {col} AS score, {grp} AS grp,
                       row_number() OVER (PARTITION BY {grp} ORDER BY hash(key, ?)) AS r
                FROM scores WHERE {ok}
            )
            SELECT CASE WHEN a.score >= b.score THEN a.caption ELSE b.caption END AS caption,
                   CASE WHEN a.score >= b.score THEN a.url ELSE b.url END AS url_0,
                   CASE WHEN a.score >= b.score THEN a.key ELSE b.key END AS key_0,
                   greatest(a.score, b.score) AS score_0,
                   CASE WHEN a.score >= b.score THEN b.url ELSE a.url END AS url_1,
                   CASE WHEN a.score >= b.score THEN b.key ELSE a.key END AS key_1,
                   least(a.score, b.score) AS score_1,
                   1 AS label_0,
                   abs(a.score - b.score) AS margin,
                   CAST(a.grp AS VARCHAR) AS "group"
            FROM ranked a JOIN ranked b
              ON a.grp IS NOT DISTINCT FROM b.grp AND b.r > a.r AND b.r <= a.r + {NEIGHBOURS}
            WHERE abs(a.score - b.score) >= ?
            ORDER BY hash(a.key, b.key, ?) LIMIT ?"""
        pr = run_sql(con, pair_sql, [seed, margin, seed, pairs])
        folder = child_path(out, p, what="profile")
        write_table(ex, folder / "exemplars.parquet")
        write_table(neg, folder / "negatives.parquet")
        write_table(pr, folder / "pairs.parquet")
        report[p] = {"exemplars": ex.num_rows, "negatives": neg.num_rows, "pairs": pr.num_rows, "folder": str(folder)}
    return report
