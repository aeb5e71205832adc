"""A user's few-shot ratings: CSV, TSV or Parquet with ``image`` and ``score`` (and optionally ``user``),
or pairwise answers with ``image_a``, ``image_b`` and ``winner`` (a, b or tie).

``image`` is a path (absolute, or relative to the ratings file) or, with ``shards``, a sample key in
those WebDataset shards. Every problem is collected and reported at once, by row number, before anything
is learned: a file that fails validation teaches nothing.
"""

from __future__ import annotations

import math
import os
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import LaionfilterError
from .images import ImageDecodeError
from .log import note
from .metrics import ranks_anything
from .names import check_name, is_plain_name, name_key
from .safefiles import file_sha256
from .tables import read_table, require_columns, resolve_path

MAX_LISTED = 30


@dataclass
class UserRatings:
    """One user's answers (their support set), decoded and preprocessed once; ``objective.Scored`` or
    ``objective.Paired`` is what a fit takes from it."""

    user: str
    images: list[str]  # resolved path or shard key, one per distinct image
    scores: np.ndarray | None  # float64, mean over duplicate rows; None for pairwise answers
    pixels: torch.Tensor  # [N, 3, H, W], the bank's eval transform applied
    rows: list[list[int]]  # file row numbers behind each image
    pairs: np.ndarray | None = None  # [P, 2]: (preferred, other) image indices, pairwise answers only
    ties: np.ndarray | None = None  # [T, 2]: pairs answered as a tie (kept, not learned from)


@dataclass
class Ratings:
    """A validated ratings file: one support set per user, and what a profile records about the file."""

    path: Path
    supports: list[UserRatings]
    per_user: bool  # the file has a user column: one profile per user, in a folder
    sha256: str


def _report(path, problems: list[str]) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise LaionfilterError(f"{path}: {len(problems)} problem(s); nothing was learned:\n  "
                               + "\n  ".join(problems[:MAX_LISTED]) + more)


def _shard_images(shards: str, keys: set[str], allow_pipe: bool = False) -> dict[str, bytes]:
    """Image bytes for the wanted keys, reading each shard once with the scorer's reader."""
    from .reader import Sample, read_shard
    from .shards import expand_shards

    found: dict[str, bytes] = {}
    for url in expand_shards(shards, allow_pipe):
        for item in read_shard(url):
            if isinstance(item, Sample):
                image = item.image
                if item.key in keys and item.key not in found and image is not None:
                    found[item.key] = image[1]
            elif item.error:
                raise LaionfilterError(f"{url}: cannot read shard ({item.error})")
    return found


def _users(table, path: Path, default_user: str | None, problems: list[str]) -> list[str]:
    """The user of each row (checked: plain, distinct), or one default; a bad name is reported here once."""
    n = table.num_rows
    if "user" not in table.column_names:
        return [check_name(default_user or path.stem, "profile name", path)] * n
    users = [unicodedata.normalize("NFC", str(u)) if u is not None else "" for u in table.column("user").to_pylist()]
    for i, u in enumerate(users):
        if not u:
            problems.append(f"row {i + 2}: user is empty")
        elif not is_plain_name(u):
            try:
                check_name(u, "user")
            except LaionfilterError as e:
                problems.append(f"row {i + 2}: {e} (it names the profile file and the score column)")
            users[i] = ""  # reported once, here
    spellings: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, u in enumerate(users):
        if u:
            spellings[name_key(u)][u].append(i + 2)
    for same in spellings.values():
        if len(same) > 1:
            problems.append("users " + " and ".join(f"{u!r} (rows {_rows(r)})" for u, r in same.items())
                            + " collide: they differ only in case, and would write the same profile file and score column")
    return users


def _rows(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:8])) + (", ..." if len(numbers) > 8 else "")


def _images(values: list, path: Path, shards: str | None, found: dict[str, bytes] | None, transform: Callable,
            problems: list[str], column: str = "image") -> tuple[list[str | None], dict[str, torch.Tensor]]:
    """Each row's image reference (resolved path or shard key; None if missing or unreadable) and the
    pixels of each distinct image, decoded once. ``found``: the image bytes read from ``shards``."""
    n = len(values)
    refs: list[str | None] = [None] * n
    sources: dict[str, bytes | Path] = {}
    if shards:
        for i, v in enumerate(values):
            if v is None or str(v) not in found:
                problems.append(f"row {i + 2}: sample key {v!r} not found in {shards}")
            else:
                refs[i] = str(v)
                sources[str(v)] = found[str(v)]
    else:
        for i, v in enumerate(values):
            if v is None or str(v) == "":
                problems.append(f"row {i + 2}: {column} is empty")
                continue
            p = resolve_path(str(v), path.parent)
            try:
                found = p.is_file()
            except OSError as e:  # a path too long for the file system, say
                problems.append(f"row {i + 2}: {column} {str(v)[:80]!r}{'...' if len(str(v)) > 80 else ''} "
                                f"is not a usable path ({e.strerror})")
                continue
            if not found:
                problems.append(f"row {i + 2}: {column} {v!r} not found (looked for {p})")
                continue
            refs[i] = str(p.resolve())
            sources[refs[i]] = p
    pixels: dict[str, torch.Tensor] = {}
    first_row: dict[str, int] = {}
    for i, r in enumerate(refs):
        if r is not None and r not in pixels and r not in first_row:
            first_row[r] = i
            try:
                pixels[r] = transform(sources[r])
            except ImageDecodeError as e:
                problems.append(f"row {i + 2}: {column} {values[i]!r} is unreadable ({e.kind}: {e})")
    for i, r in enumerate(refs):
        if r is not None and r not in pixels:
            if first_row.get(r) != i:
                problems.append(f"row {i + 2}: {column} {values[i]!r} is unreadable (see row {first_row[r] + 2})")
            refs[i] = None
    return refs, pixels


MAX_SCORE = 1e6  # any rating scale people use fits many times over; past it, fits and calibrations overflow


def parse_score(value: Any) -> float:
    """A score cell as a finite number of at most ``MAX_SCORE`` in magnitude; a ValueError saying what is
    wrong with it otherwise."""
    if isinstance(value, bool):  # a Parquet boolean column is not a rating scale
        raise ValueError(f"score {value!r} is not a number")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"score {value!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"score is {value!r}")
    if abs(v) > MAX_SCORE:
        raise ValueError(f"score {value!r} is beyond ±{MAX_SCORE:.0e}; use the rating scale itself (1–10, 1–5, ...)")
    return v


def _keys_in_shards(table, columns: list[str], shards: str | None, allow_pipe: bool) -> dict[str, bytes] | None:
    if not shards:
        return None
    wanted = {str(v) for c in columns for v in table.column(c).to_pylist() if v is not None}
    return _shard_images(shards, wanted, allow_pipe)


def read_ratings(path: str | os.PathLike, transform: Callable, shards: str | None = None,
                 default_user: str | None = None, allow_pipe: bool = False) -> Ratings:
    """Validate a ratings file (read once) and return one preprocessed support set per user.

    A file with ``image_a``, ``image_b`` and ``winner`` columns (``laionfilter rate --mode pairs``) holds
    pairwise answers instead of scores; see ``read_pairs``.
    """
    path = Path(path)
    table = read_table(path)
    if {"image_a", "image_b", "winner"} <= set(table.column_names):
        return read_pairs(path, table, transform, shards, default_user, allow_pipe)
    require_columns(table, ["image", "score"], path)
    n = table.num_rows
    if n == 0:
        raise LaionfilterError(f"{path}: no rows")
    images = table.column("image").to_pylist()
    raw_scores = table.column("score").to_pylist()
    problems: list[str] = []
    scores = np.full(n, np.nan)
    for i, s in enumerate(raw_scores):
        try:
            scores[i] = parse_score(s)
        except ValueError as e:
            problems.append(f"row {i + 2}: {e}")  # row 1 is the header (Parquet: the same numbering)
    users = _users(table, path, default_user, problems)
    refs, pixels = _images(images, path, shards, _keys_in_shards(table, ["image"], shards, allow_pipe), transform,
                           problems)

    by_user: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (u, r) in enumerate(zip(users, refs)):
        if u and r is not None and not math.isnan(scores[i]):
            by_user[u][r].append(i)
    for u in dict.fromkeys(users):
        if not u:
            continue
        if not ranks_anything([scores[i] for rows in by_user.get(u, {}).values() for i in rows]):
            rows = [i + 2 for i, x in enumerate(users) if x == u]
            problems.append(f"user {u!r} (rows {_rows(rows)}): fewer than two distinct valid scores; nothing to rank")
    _report(path, problems)

    out = []
    for u, per_image in by_user.items():
        dups = {r: rows for r, rows in per_image.items() if len(rows) > 1}
        for r, rows in dups.items():
            note(f"{path}: rows {', '.join(str(i + 2) for i in rows)} rate the same image {images[rows[0]]!r}"
                 f"{f' for user {u!r}' if 'user' in table.column_names else ''}; using their mean score")
        keys = list(per_image)
        out.append(UserRatings(
            user=u, images=keys,
            scores=np.array([np.mean([scores[i] for i in per_image[k]]) for k in keys]),
            pixels=torch.stack([pixels[k] for k in keys]),
            rows=[[i + 2 for i in per_image[k]] for k in keys],
        ))
    return Ratings(path, out, "user" in table.column_names, file_sha256(path).hexdigest())


def read_pairs(path: Path, table, transform: Callable, shards: str | None = None,
               default_user: str | None = None, allow_pipe: bool = False) -> Ratings:
    """Pairwise answers (``image_a``, ``image_b``, ``winner`` = a, b or tie): one support set per user,
    whose ``pairs`` are (preferred, other) image indices. Ties are kept in ``ties`` and left out of
    the Bradley–Terry loss, which has no term for them (the paper's eq. 3 ranks strict preferences)."""
    n = table.num_rows
    if n == 0:
        raise LaionfilterError(f"{path}: no rows")
    problems: list[str] = []
    winners = [str(w).strip().lower() if w is not None else "" for w in table.column("winner").to_pylist()]
    for i, w in enumerate(winners):
        if w not in ("a", "b", "tie"):
            problems.append(f"row {i + 2}: winner {w!r} is not a, b or tie")
    users = _users(table, path, default_user, problems)
    found = _keys_in_shards(table, ["image_a", "image_b"], shards, allow_pipe)  # the shards read once for both
    a_refs, a_pix = _images(table.column("image_a").to_pylist(), path, shards, found, transform, problems, "image_a")
    b_refs, b_pix = _images(table.column("image_b").to_pylist(), path, shards, found, transform, problems, "image_b")
    pixels = {**a_pix, **b_pix}
    per_user: dict[str, list[int]] = defaultdict(list)
    for i, u in enumerate(users):
        if u and a_refs[i] and b_refs[i] and winners[i] in ("a", "b", "tie"):
            if a_refs[i] == b_refs[i]:
                problems.append(f"row {i + 2}: image_a and image_b are the same image")
            else:
                per_user[u].append(i)
    for u in dict.fromkeys(u for u in users if u):
        if not any(winners[i] != "tie" for i in per_user.get(u, [])):
            problems.append(f"user {u!r}: no pair with a winner; nothing to rank")
    _report(path, problems)

    out = []
    for u, rows in per_user.items():
        keys = list(dict.fromkeys(r for i in rows for r in (a_refs[i], b_refs[i])))
        at = {k: j for j, k in enumerate(keys)}
        strict = [(at[a_refs[i]], at[b_refs[i]]) if winners[i] == "a" else (at[b_refs[i]], at[a_refs[i]])
                  for i in rows if winners[i] != "tie"]
        out.append(UserRatings(
            user=u, images=keys, scores=None, pixels=torch.stack([pixels[k] for k in keys]),
            rows=[[i + 2 for i in rows if k in (a_refs[i], b_refs[i])] for k in keys],
            pairs=np.array(strict, dtype=np.int64),
            ties=np.array([(at[a_refs[i]], at[b_refs[i]]) for i in rows if winners[i] == "tie"], dtype=np.int64),
        ))
    return Ratings(path, out, "user" in table.column_names, file_sha256(path).hexdigest())
