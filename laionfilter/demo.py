"""The one-command demo: learn → score → select → guidance → a DuckDB query, on the starter bank.

Everything it uses ships with the package, so that it runs without the training extras: example shards
(crops of photos the starter bank never saw, degraded at random along the starter criteria) and a
ratings file of 36 images rated 1–5 stars by "alice", who likes bright, warm, sharp photos. The two
``write_example_*`` functions say how they were made (they need ``pip install 'laionfilter[train]'``).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import LaionfilterError
from .recipe import LearnConfig

EXAMPLE = Path(__file__).parent / "data" / "example"
TASTE = {"exposure": 0.4, "warmth": 0.3, "sharpness": 0.3}  # alice's hidden taste, for the record


def _degraded_crop(photo, rng, size: int):
    from .train.starter import degraded, random_crop

    img = random_crop(photo, size, rng)
    levels = {}
    for c in ("sharpness", "noise", "exposure", "colourfulness", "contrast", "warmth"):
        u = float(rng.uniform()) if rng.random() < 0.5 else 0.0
        img = degraded(img, c, u, rng)
        levels[c] = u
    return img, levels


def write_example_ratings(folder: Path, n: int = 36, seed: int = 7) -> Path:
    """How the bundled ratings were made (kept so they can be remade): crops rated by alice's taste."""
    from .train.starter import load_photo

    rng = np.random.default_rng(seed)
    photos = [load_photo(p) for p in ("coffee", "china", "flower")]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    tastes = []
    for i in range(n):
        img, levels = _degraded_crop(photos[i % 3], rng, 128)
        tastes.append(sum(w * (1 - levels[c]) for c, w in TASTE.items()))
        img.save(folder / "images" / f"{i:02d}.jpg", quality=92)
    t = np.array(tastes)
    stars = np.clip(np.round(1 + 4 * (t - t.min()) / (t.max() - t.min())), 1, 5).astype(int)  # she uses all 5 stars
    rows = ["image,score"] + [f"images/{i:02d}.jpg,{s}" for i, s in enumerate(stars)]
    (folder / "ratings.csv").write_text("\n".join(rows) + "\n")
    return folder / "ratings.csv"


def write_example_shards(folder: Path = EXAMPLE / "shards", shards: int = 4, per_shard: int = 24, seed: int = 11) -> Path:
    import webdataset as wds

    from .train.starter import load_photo

    rng = np.random.default_rng(seed)
    names = ["coffee", "china", "flower", "coins", "gravel"]
    photos = {n: load_photo(n) for n in names}
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                name = names[int(rng.integers(len(names)))]
                img, _ = _degraded_crop(photos[name], rng, int(rng.integers(96, 160)))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                key = f"{s:05d}{i:04d}"
                caption = f"a photo of {name.replace('_', ' ')}"
                sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": caption.encode(),
                            "json": json.dumps({"key": key, "url": f"https://example.com/demo/{key}.jpg",
                                                "caption": caption, "width": img.width, "height": img.height}).encode()})
    return folder


def run_demo(out: str | Path, steps: int = LearnConfig.steps, echo: Callable[[str], Any] = print, progress: bool = True,
             overwrite: bool = False) -> dict[str, Path]:
    from .guidance import guidance_sets
    from .profile import learn_profiles
    from .query import query, select, write_table
    from .report import report
    from .score import ScoreConfig, score_shards
    from .bank import resolve_bank

    out = Path(out)
    paths = {"ratings": out / "ratings" / "ratings.csv", "shards": out / "shards", "profile": out / "alice.profile",
             "scores": out / "scores", "subset": out / "alice-top20.parquet",
             "four_stars": out / "alice-4-stars.parquet", "guidance": out / "guidance", "report": out / "alice.html"}
    made = [p for k, p in paths.items() if k != "ratings" and p.exists()]
    if made and not overwrite:  # refuse before replacing anything
        raise LaionfilterError(f"{out}: holds a previous demo's outputs ({', '.join(p.name for p in made)}); "
                               "rerun with --overwrite to replace them, or give another --out")
    out.mkdir(parents=True, exist_ok=True)
    if not paths["ratings"].exists():
        shutil.copytree(EXAMPLE, out / "ratings", dirs_exist_ok=True, ignore=shutil.ignore_patterns("shards"))
    echo(f"1. example ratings (36 images, 1–5 stars): {paths['ratings']}")
    shutil.copytree(EXAMPLE / "shards", paths["shards"], dirs_exist_ok=True)
    echo(f"2. example shards (4 × 24 images the starter bank never saw): {paths['shards']}")
    bank = resolve_bank("starter")
    [profile] = learn_profiles(paths["ratings"], bank, paths["profile"], LearnConfig(steps=steps), progress=progress,
                               name="alice")
    m = profile.meta
    echo(f"3. learned alice's profile ({steps} steps; support SROCC {m['support_srocc_before']:.2f} → "
         f"{m['support_srocc_after']:.2f}): {paths['profile']}")
    s = score_shards(str(paths["shards"]), [paths["profile"]], paths["scores"], bank=bank,
                     cfg=ScoreConfig(workers=2, batch_size=64, overwrite=overwrite), progress=progress)
    echo(f"4. scored {s['scored']} images in {s['done'] + s['skipped']} shards: {paths['scores']}")
    echo("   (column alice ranks them for her; alice_rating is the 1–5 stars she would give, mapped from "
         "out-of-fold fits of her ratings)")
    write_table(select(paths["scores"], "alice", top=20), paths["subset"])
    liked = select(paths["scores"], "alice", min_rating=4)
    write_table(liked, paths["four_stars"])
    echo(f"5. alice's top 20, ready for img2dataset (url, caption): {paths['subset']}\n"
         f"   and the {liked.num_rows} images she would give 4 stars or more: {paths['four_stars']}")
    g = guidance_sets(paths["scores"], paths["guidance"], ["alice"], top=20, bottom=20, pairs=100, margin=1.0)
    echo(f"6. guidance sets ({g['alice']['exemplars']} exemplars, {g['alice']['negatives']} negatives, "
         f"{g['alice']['pairs']} preference pairs): {paths['guidance'] / 'alice'}")
    t = query(paths["scores"], "SELECT split_part(caption, ' of ', 2) AS subject, count(*) AS images, "
                               "round(avg(alice_rating), 1) AS stars FROM scores WHERE status = 'ok' "
                               "GROUP BY subject ORDER BY avg(alice) DESC")
    echo("7. DuckDB: alice's mean stars per subject\n" + "\n".join(
        f"   {r['subject']:<10} {r['images']:>4} images  {r['stars']:.1f} stars" for r in t.to_pylist()))
    r = report(paths["scores"], "alice", paths["report"])
    echo(f"8. a page of what alice's profile selects ({r['thumbnails']} thumbnails; open it in a browser): "
         f"{paths['report']}")
    return paths
