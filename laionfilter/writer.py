"""The scores folder: one Parquet part per shard, a ``_stats.json`` per shard written last, a manifest.

A part is written under a hidden temporary name and renamed when whole; its stats file, written after
the rename, is the shard's "done" marker. A rerun skips a shard whose stats say ``done`` for the same
manifest fingerprint, and redoes any other shard whole.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import LaionfilterError
from .formats import SCORES_FORMAT, validate
from .reader import Source
from .safefiles import atomic_write, read_json, write_json

FIXED_COLUMNS = ["key", "shard", "url", "caption", "width", "height", "status", "error"]


def rating_column(profile: str) -> str:
    """The column of a calibrated profile's ratings on the user's own scale, beside its score column."""
    return f"{profile}_rating"


def rating_columns(profiles: list[tuple[str, Any]]) -> dict[str, str]:
    """{rating column: score column} for the (column, Profile) pairs whose profile is calibrated: the one
    place that decides which score columns get a rating column beside them."""
    return {rating_column(column): column for column, prof in profiles if prof.calibration is not None}


def schema(profiles: list[str]) -> pa.Schema:
    return pa.schema([("key", pa.string()), ("shard", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                      ("width", pa.int32()), ("height", pa.int32()), ("status", pa.string()), ("error", pa.string())]
                     + [(p, pa.float32()) for p in profiles])


def manifest_fingerprint(manifest: dict[str, Any]) -> str:
    body = {k: manifest[k] for k in ("format", "bank", "profiles", "preprocess", "images") if k in manifest}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def prepare_output(out: Path, manifest: dict[str, Any], overwrite: bool) -> str:
    """Create or check the folder's manifest; returns the run's fingerprint."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = {**manifest, "format": SCORES_FORMAT}
    fp = manifest_fingerprint(manifest)
    path = out / "_manifest.json"
    if path.exists() and not overwrite:
        old = validate(read_json(path, what="scores manifest"), SCORES_FORMAT, path)
        if old.get("fingerprint") != fp:
            raise LaionfilterError(
                f"{out}: holds scores made with other profiles, bank, preprocessing or images "
                f"({', '.join(p['name'] for p in old.get('profiles', []))}); use --overwrite to redo it, or another --out")
    write_json(path, {**manifest, "fingerprint": fp})
    return fp


def stats_path(out: Path, name: str) -> Path:
    return out / f"{name}_stats.json"


def shard_done(out: Path, name: str, fingerprint: str) -> bool:
    p = stats_path(out, name)
    if not p.exists():
        return False
    try:
        s = json.loads(p.read_text())
    except (json.JSONDecodeError, OSError):
        return False
    return s.get("status") == "done" and s.get("fingerprint") == fingerprint and (out / f"{name}.parquet").exists()


@dataclass
class ShardRows:
    """Rows of one shard as they come, written out in one go when the shard ends."""

    url: Source
    name: str
    profiles: list[str]
    started: float = field(default_factory=time.time)
    columns: dict[str, list] = field(default_factory=dict)  # the fixed columns' values, row by row
    scores: dict[str, list[np.ndarray]] = field(default_factory=dict)  # per score column, one array per batch
    scored: list[np.ndarray] = field(default_factory=list)  # per batch: which of its rows have scores

    def __post_init__(self):
        self.columns = {c: [] for c in FIXED_COLUMNS}
        self.scores = {p: [] for p in self.profiles}

    def add(self, rows: list[dict[str, Any]], index: list[int], scores: dict[str, np.ndarray]) -> None:
        """A batch's rows (the fixed columns) and the scores of its rows ``index`` (those with pixels; the
        others get nulls), one array per score column."""
        for c in FIXED_COLUMNS:
            self.columns[c].extend(r[c] for r in rows)
        has = np.zeros(len(rows), dtype=bool)
        has[index] = True
        self.scored.append(has)
        for p in self.profiles:
            column = np.zeros(len(rows), dtype=np.float32)
            column[index] = scores[p]
            self.scores[p].append(column)

    def __len__(self) -> int:
        return len(self.columns["key"])

    def finish(self, out: Path, fingerprint: str, error: str | None) -> dict[str, Any]:
        null = ~np.concatenate(self.scored) if self.scored else np.zeros(0, dtype=bool)
        columns = dict(self.columns)
        for p, batches in self.scores.items():
            values = np.concatenate(batches) if batches else np.zeros(0, dtype=np.float32)
            columns[p] = pa.array(values, type=pa.float32(), mask=null)
        table = pa.table(columns, schema=schema(self.profiles))
        with atomic_write(out / f"{self.name}.parquet") as tmp:
            pq.write_table(table, tmp)
        statuses = table.column("status").to_pylist()
        counts: dict[str, int] = {}
        for s in statuses:
            counts[s] = counts.get(s, 0) + 1
        stats = {"shard": str(self.url), "name": self.name, "status": "failed" if error else "done", "error": error,
                 "samples": len(statuses), "ok": counts.get("ok", 0), "statuses": counts,
                 "seconds": round(time.time() - self.started, 3), "fingerprint": fingerprint}
        write_json(stats_path(out, self.name), stats)
        return stats
