"""`laionfilter report`: one self-contained HTML page of what a profile selects, to look at rather than read.

The page holds a profile's top and bottom images and a strip per tenth of its scores (deciles), each
thumbnail embedded (base64 JPEG: no server, no files beside it) with its calibrated rating (or its
score) under it. Pixels are read from where the scores came from: the shards named in each part's
``_stats.json`` (or ``shards``, if they moved), or the image folder in the manifest.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from .errors import LaionfilterError
from .formats import SCORES_FORMAT, validate
from .query import columns, connect, quote, require_profile, run_sql
from .safefiles import read_json
from .writer import rating_column

THUMB = 160  # pixels, the longer side


def _thumbnail(data: bytes) -> str | None:
    from PIL import Image

    from .images import ImageDecodeError, decode

    try:
        img = Image.fromarray(decode(data).permute(1, 2, 0).numpy())
    except ImageDecodeError:
        return None
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _sources(scores: Path, shards: str | None, allow_pipe: bool) -> dict[str, Any]:
    """Each part's source (shard URL, or image chunk), by part name."""
    from .reader import ImageChunk, shard_name
    from .shards import expand_sources

    if shards:
        return {shard_name(u): u for u in expand_sources(shards, allow_pipe)}
    path = scores / "_manifest.json"
    manifest = validate(read_json(path, what="scores manifest"), SCORES_FORMAT, path) if path.exists() else {}
    out: dict[str, Any] = {}
    for stats in scores.glob("*_stats.json"):
        name = stats.name.removesuffix("_stats.json")
        if "images" in manifest:
            out[name] = ImageChunk(name, manifest["images"]["root"], ())  # keys are paths under root
        else:
            out[name] = json.loads(stats.read_text()).get("shard")
    return out


def _read(picked: dict[str, list[str]], sources: dict[str, Any], allow_pipe: bool) -> dict[tuple[str, str], bytes]:
    """The image bytes of the picked keys, reading each shard once."""
    from .reader import ImageChunk, Sample, read_shard
    from .shards import is_remote

    found: dict[tuple[str, str], bytes] = {}
    for part, keys in picked.items():
        src = sources.get(part)
        if src is None:
            continue
        if isinstance(src, ImageChunk):  # keys come from a file: only paths inside the folder are read
            root = os.path.realpath(src.root)
            inside = [k for k in keys if os.path.commonpath([root, os.path.realpath(os.path.join(root, k))]) == root]
            src = ImageChunk(part, src.root, tuple(sorted(inside)))
        elif (src.startswith("pipe:") and not allow_pipe) or (not is_remote(src) and not Path(src).is_file()):
            continue  # a pipe runs only with --allow-pipe, as everywhere; a moved shard is skipped
        wanted = set(keys)
        for s in read_shard(src):
            if isinstance(s, Sample) and s.key in wanted and s.image is not None:
                found[(part, s.key)] = s.image[1]
    return found


def report(scores: str | os.PathLike, profile: str, out: str | os.PathLike, *, top: int = 12, per_decile: int = 8,
           shards: str | None = None, allow_pipe: bool = False) -> dict[str, Any]:
    """Write the page; returns how many thumbnails it holds and how many images could not be found."""
    from .safefiles import atomic_write

    scores = Path(scores)
    con = connect(scores)
    require_profile(con, profile, scores)
    rating = rating_column(profile) if rating_column(profile) in columns(con, "scores") else None
    value = quote(rating) if rating else quote(profile)
    base = (f"SELECT key, shard, {quote(profile)} AS score, {value} AS shown FROM scores "
            f"WHERE status = 'ok' AND {quote(profile)} IS NOT NULL")
    n = run_sql(con, f"SELECT count(*) AS n FROM ({base})").column("n")[0].as_py()
    if n == 0:
        raise LaionfilterError(f"{scores}: no scored image for {profile!r}")
    sections = {
        "top": run_sql(con, f"{base} ORDER BY score DESC, key LIMIT ?", [top]).to_pylist(),
        "bottom": run_sql(con, f"{base} ORDER BY score ASC, key LIMIT ?", [top]).to_pylist(),
    }
    deciles = run_sql(con, f"""
        SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY d ORDER BY hash(key)) AS r
                       FROM (SELECT *, ntile(10) OVER (ORDER BY score) AS d FROM ({base})))
        WHERE r <= ? ORDER BY d DESC, score DESC""", [per_decile]).to_pylist()
    for row in deciles:
        sections.setdefault(f"decile {row['d']}", []).append(row)
    picked: dict[str, list[str]] = defaultdict(list)
    for rows in sections.values():
        for r in rows:
            picked[r["shard"]].append(r["key"])
    images = _read(picked, _sources(scores, shards, allow_pipe), allow_pipe)
    thumbs = {k: _thumbnail(v) for k, v in images.items()}
    shown = sum(1 for rows in sections.values() for r in rows if thumbs.get((r["shard"], r["key"])))
    page = _page(profile, sections, thumbs, n, "rating" if rating else "score")
    with atomic_write(Path(out)) as tmp:
        tmp.write_text(page, encoding="utf-8")
    missing = sum(len(rows) for rows in sections.values()) - shown
    return {"thumbnails": shown, "missing": missing, "images": n, "out": str(out)}


def _page(profile: str, sections: dict[str, list[dict]], thumbs: dict, n: int, what: str) -> str:
    e = html.escape
    titles = {"top": f"Top {len(sections['top'])}", "bottom": f"Bottom {len(sections['bottom'])}"}
    body = []
    for name, rows in sections.items():
        title = titles.get(name) or f"Tenth {name.split()[1]} of 10 by score (10 is the best)"
        cells = []
        for r in rows:
            src = thumbs.get((r["shard"], r["key"]))
            img = f'<img src="{src}" alt="{e(r["key"])}">' if src else '<div class="gone">not found</div>'
            cells.append(f'<figure title="{e(r["shard"])}/{e(r["key"])}">{img}'
                         f'<figcaption>{r["shown"]:.2f}</figcaption></figure>')
        body.append(f'<section><h2>{e(title)}</h2><div class="strip">{"".join(cells)}</div></section>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(profile)}: what the profile selects</title>
<style>
body {{ margin: 1.5rem; background: #16181d; color: #e8e6e3; font: 15px/1.4 system-ui, sans-serif; }}
h1 {{ font-size: 1.3rem; margin: 0 0 .3rem; }} h2 {{ font-size: 1rem; margin: 1.2rem 0 .4rem; color: #f0b429; }}
p {{ color: #9aa0a6; margin: 0; }}
.strip {{ display: flex; flex-wrap: wrap; gap: .6rem; }}
figure {{ margin: 0; display: flex; flex-direction: column; align-items: center; gap: .2rem; }}
figure img {{ max-width: {THUMB}px; max-height: {THUMB}px; border-radius: .25rem; }}
figcaption {{ color: #9aa0a6; font-size: .85rem; font-variant-numeric: tabular-nums; }}
.gone {{ width: {THUMB // 2}px; height: {THUMB // 2}px; display: grid; place-items: center; color: #9aa0a6;
  border: 1px dashed #3a3f4b; font-size: .75rem; }}
</style></head><body>
<h1>{e(profile)}: what the profile selects</h1>
<p>{n:,} scored images. Under each image: its {e(what)}{" on the user's own scale" if what == "rating" else ""}.</p>
{"".join(body)}
</body></html>
"""
