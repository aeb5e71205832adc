"""Issue 15: which start for ten ratings? Candidate merges weighed by their SROCC on the support set, untrained.

The paper starts α at softmax(SROCC / T) over the task models. ``learn --init mixes`` (the default)
takes the softmax over a larger library of candidate merges instead (``learn.mixes``: each task, each
pair averaged, each task less half another), since a taste is usually a mix of criteria, sometimes
against one. This benchmark measures, with no training at all, on `at_scale.py`'s user sets and
splits (``evaluate.support_split``), the test SROCC of each library:

- ``tasks``: the task models alone (the paper's adaptive start; "best" is the best single task baseline)
- ``pairs``: the tasks and each pair averaged
- ``mixes``: ``learn.mixes``, the pairs and each task less half another

each picked two ways: the best candidate on the support set ("best"), and the softmax-weighted mean of
the candidates' coefficients at each temperature T ("soft T"), one merged model. The library's
predictions on a user's images are computed once; only the soft picks need one forward per split.

    python benchmarks/at_scale.py --users 12 --simulate-only --plan "recipe:10:seed0,seed1,against2" --out at-scale
    python benchmarks/mixes.py --data at-scale --sets seed0 --out mixes-seed0.json  # about 6 min on one core

Settings are chosen on the first set (seed0); run the others as held-out checks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from laionfilter.bank import resolve_bank
from laionfilter.evaluate import support_split
from laionfilter.learn import Merger, mixes
from laionfilter.metrics import srocc
from laionfilter.model import eval_transform
from laionfilter.ratings import read_ratings
from laionfilter.safefiles import write_json


def libraries(n: int) -> dict[str, np.ndarray]:
    """Rows of ``mixes(n)`` each library uses: the tasks come first, then the n(n−1)/2 pairs."""
    pairs = n + n * (n - 1) // 2
    return {"tasks": np.arange(n), "pairs": np.arange(pairs), "mixes": np.arange(len(mixes(n)))}


def split_picks(merger: Merger, pixels: torch.Tensor, y: np.ndarray, preds: np.ndarray, sup: np.ndarray,
                test: np.ndarray, temperatures: list[float]) -> dict[str, float]:
    """Test SROCC of each library's best candidate and softmax mean, from the support images ``sup``."""
    coef = mixes(merger.bank.n)
    zs = np.array([srocc(y[sup], p[sup]) for p in preds])
    out = {}
    for lib, rows in libraries(merger.bank.n).items():
        out[f"{lib}, best"] = srocc(y[test], preds[rows[int(np.argmax(zs[rows]))]][test])
        for t in temperatures:
            w = np.exp((zs[rows] - zs[rows].max()) / t)
            alpha = torch.tensor((w / w.sum()) @ coef[rows], dtype=torch.float32)
            out[f"{lib}, soft T={t:g}"] = srocc(y[test], merger.predict(alpha, pixels)[test])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="at_scale.py's --out (its data-<set> folders)")
    ap.add_argument("--sets", default="seed0")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="the split seed (at_scale.py's --seed)")
    ap.add_argument("--temperatures", default="0.03,0.05,0.1,0.2")
    ap.add_argument("--bank", default="starter")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    temperatures = [float(t) for t in args.temperatures.split(",")]
    bank = resolve_bank(args.bank)
    merger = Merger(bank, torch.device("cpu"))
    result: dict = {"shots": args.shots, "trials": args.trials, "seed": args.seed, "sets": {}}
    for name in args.sets.split(","):
        table = args.data / f"data-{name}" / "ratings.csv"
        if not table.exists():
            sys.exit(f"{table}: not found; write the user sets with at_scale.py --simulate-only")
        runs = []
        for u, user in enumerate(read_ratings(table, eval_transform(bank.architecture)).supports):
            preds = merger.mix_predictions(user.pixels)
            for trial in range(args.trials):
                sup, test, _ = support_split(len(user.scores), args.seed, u, args.shots, trial)
                if len(set(user.scores[sup].tolist())) < 2:
                    continue
                picks = split_picks(merger, user.pixels, user.scores, preds, sup, test, temperatures)
                runs += [{"user": user.user, "trial": trial, "method": m, "srocc": v} for m, v in picks.items()]
            print(f"{name}: {user.user} done", flush=True)
        summary = {}
        for m in dict.fromkeys(r["method"] for r in runs):  # mean over users per trial, then over trials
            per_trial = [np.mean([r["srocc"] for r in runs if r["method"] == m and r["trial"] == t])
                         for t in range(args.trials)]
            summary[m] = {"mean": float(np.mean(per_trial)), "std": float(np.std(per_trial, ddof=1))}
        result["sets"][name] = {"summary": summary, "runs": runs}
        base = summary["tasks, best"]["mean"]
        print(f"\n## {name}, {args.shots} shots, {args.trials} trials: mean test SROCC (vs the best single task)\n")
        for m, s in summary.items():
            print(f"| {m} | {s['mean']:.3f} ± {s['std']:.3f} | {s['mean'] - base:+.3f} |")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
