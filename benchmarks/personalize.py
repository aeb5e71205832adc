"""Personalisation benchmark: `laionfilter evaluate` on the starter bank with simulated users.

Users rate crops of the photos the starter bank never saw (its reserved `eval` photos). Each image is
degraded at random levels along several criteria at once; a user's score is a hidden weighted mix of
how little each criterion is degraded, plus rating noise, rounded to a 1–10 scale. Some users' taste
includes JPEG quality, a criterion that no task of the starter bank covers. Every method sees the same
support and test images (paired splits).

    python benchmarks/personalize.py --users 8 --trials 2 --out benchmarks/results/personalize

prints the Markdown table and writes the JSON with every number and a per-user plot.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np

from laionfilter.evaluate import (default_methods, evaluate, markdown_table, plot_per_user, tune_methods,
                                  with_steps_from)
from laionfilter.recipe import LearnConfig
from laionfilter.safefiles import write_json
from laionfilter.bank import resolve_bank
from laionfilter.train.starter import GREY, PHOTOS, degrade, load_photo, random_crop

COVERED = ["sharpness", "noise", "exposure", "colourfulness", "contrast", "warmth"]


def simulate_users(out: Path, users: int, images: int, seed: int, against: bool = False) -> Path:
    """``against``: the third user set, whose users mostly dislike what some tasks reward: each weight
    but the largest is negated with probability 0.7 (at least one is), so that such a user prefers
    images degraded along that criterion."""
    rng = np.random.default_rng(seed)
    # Colour photos only: on a grey photo a colourfulness taste would rate an invisible change.
    photos = {n: load_photo(n) for n in PHOTOS["eval"] if n not in GREY}
    names = list(photos)
    rows = ["user,image,score"]
    (out / "images").mkdir(parents=True, exist_ok=True)
    tastes = {}
    for u in range(users):
        uncovered = u % 3 == 2  # every third user also cares about JPEG quality
        crits = list(rng.choice(COVERED, size=int(rng.integers(2, 4)), replace=False)) + (["jpeg"] if uncovered else [])
        w = rng.dirichlet(np.ones(len(crits)))
        if against:
            flip = rng.random(len(w)) < 0.7
            flip[int(np.argmax(w))] = False
            if not flip.any():
                flip[int(np.argsort(w)[0])] = True
            w = np.where(flip, -w, w)
        user = f"user{u:02d}" + ("-jpeg" if uncovered else "")
        tastes[user] = dict(zip(crits, w.round(3).tolist()))
        for i in range(images):
            img = random_crop(photos[names[int(rng.integers(len(names)))]], 64, rng)
            quality = {}
            for c in COVERED + ["jpeg"]:
                level = float(rng.uniform()) if rng.random() < 0.6 else 0.0
                data, _ = degrade(img, c, level, rng)
                from PIL import Image

                img = Image.open(io.BytesIO(data)).convert("RGB")
                quality[c] = 1 - level
            # In [0, 1] before the noise, whatever the signs: a negative weight counts 1 − quality.
            taste = (sum(wi * quality[c] for c, wi in zip(crits, w)) + np.abs(np.minimum(w, 0)).sum()
                     + rng.normal(0, 0.05))
            rel = f"images/{user}-{i:04d}.png"
            img.save(out / rel)
            rows.append(f"{user},{rel},{int(np.clip(np.round(1 + 9 * taste), 1, 10))}")
    (out / "ratings.csv").write_text("\n".join(rows) + "\n")
    write_json(out / "tastes.json", tastes)
    return out / "ratings.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--images", type=int, default=160, help="rated images per user")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--shots", default="10,100")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bank", default="starter")
    ap.add_argument("--against", action="store_true", help="the third user set: tastes that run against some "
                    "tasks' criteria (negative weights)")
    ap.add_argument("--methods", default="", help="semicolon-separated subset of method names (default: all)")
    ap.add_argument("--anchors", default="", help="extra anchored variants to compare, e.g. 0.3,3")
    ap.add_argument("--tunes", default="", help="instead: the default recipe with these --tune values, e.g. all,top-2,head")
    ap.add_argument("--steps-from", default="", help="also: the default recipe choosing its step count among these "
                    "(e.g. 0,100,250,500) by out-of-fold SROCC, calibrated (rating MAE reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: see learning_threads)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/personalize"))
    args = ap.parse_args()
    bank = resolve_bank(args.bank)
    table = simulate_users(args.out / "data", args.users, args.images, args.seed, args.against)
    # Calibration changes no prediction, only what it costs; it is measured on the --steps-from recipe.
    base = LearnConfig(steps=args.steps, device="cpu", calibration="none" if args.steps_from else "isotonic")
    methods = default_methods(base)
    if args.tunes:
        methods = tune_methods(LearnConfig(steps=args.steps, device="cpu"), args.tunes.split(","))
    for a in filter(None, args.anchors.split(",")):
        methods[f"anchored {a}/N"] = LearnConfig(steps=args.steps, device="cpu", anchor=float(a))
    methods = with_steps_from(methods, base, tuple(int(x) for x in args.steps_from.split(",") if x))
    if args.methods:
        keep = [m.strip() for m in args.methods.split(";")]
        methods = {k: v for k, v in methods.items() if k in keep}
    started = time.time()
    result = evaluate(table, bank, tuple(int(k) for k in args.shots.split(",")), args.trials, methods,
                      seed=args.seed, device="cpu", threads=args.threads)
    result["seconds"] = round(time.time() - started, 1)
    result["tastes"] = __import__("json").loads((args.out / "data" / "tastes.json").read_text())
    write_json(args.out / "results.json", result)
    plot_per_user(result, args.out / "per-user.png")
    print(markdown_table(result))
    print(f"\n{args.users} users × {args.trials} trials, {result['seconds']:.0f} s; every number in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
