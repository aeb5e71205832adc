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
Two ways of choosing from the support set itself can be added (both measured and not taken up,
README): ``--bags B``, the mixes' softmax weights averaged over B bootstrap resamples of the ratings
(seeded by the split), and ``--loo``, T chosen per user by leave-one-out over the ratings.
``--scales`` measures the mixes start at T = 0.1 with its coefficients scaled (``learn --mix-scale``).
``--ridge`` measures a start from regression instead of weighing (measured and not taken up, README):
the ratings regressed on the task models' standardised support predictions with a ridge penalty λ,
the coefficients back in prediction units and scaled to Σ|α| = 1.25 (the default start's scale); also
that regression's own prediction (the task models' outputs combined, no merge) and the mean of the
ridge start and the default one.

    python benchmarks/at_scale.py --users 12 --simulate-only --plan "recipe:10:seed0,seed1,against2" --out at-scale
    python benchmarks/mixes.py --data at-scale --sets seed0 --out mixes-seed0.json  # about 6 min on one core
    python benchmarks/mixes.py --data at-scale --sets seed0 --temperatures 0.05,0.1,0.2 --bags 50 --loo --out ...
    python benchmarks/mixes.py --data at-scale --sets seed0 --temperatures 0.1 --scales 0.6,0.8,1.25,1.5,2 --out ...
    python benchmarks/mixes.py --data at-scale --sets seed0 --temperatures 0.1 --scales 1.25 --ridge 1,3,10,30 --out ...

Settings are chosen on the first set (seed0); run the others as held-out checks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.special import softmax

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
                test: np.ndarray, temperatures: list[float], bags: int = 0,
                loo: bool = False, chosen: list[float] | None = None, scales: list[float] = (),
                ridge: list[float] = ()) -> dict[str, float]:
    """Test SROCC of each library's best candidate and softmax mean, from the support images ``sup``
    (``chosen`` collects the temperatures leave-one-out picks); with ``scales``, also the mixes'
    softmax mean at T = 0.1 (``learn --init mixes``) with its coefficients times each scale."""
    coef = mixes(merger.bank.n)
    zs = np.array([srocc(y[sup], p[sup]) for p in preds])

    def merged_alpha(alpha: np.ndarray) -> float:  # test SROCC of the merge with these per-task coefficients
        return srocc(y[test], merger.predict(torch.tensor(alpha, dtype=torch.float32), pixels)[test])

    def merged(w: np.ndarray, rows: np.ndarray, scale: float = 1.0) -> float:  # the candidates mixed by w
        return merged_alpha(scale * (w / w.sum()) @ coef[rows])

    out = {}
    for lib, rows in libraries(merger.bank.n).items():
        out[f"{lib}, best"] = srocc(y[test], preds[rows[int(np.argmax(zs[rows]))]][test])
        for t in temperatures:
            out[f"{lib}, soft T={t:g}"] = merged(softmax(zs[rows] / t), rows)
    rows = libraries(merger.bank.n)["mixes"]
    for scale in scales:
        out[f"mixes, soft T=0.1, ×{scale:g}"] = merged(softmax(zs[rows] / 0.1), rows, scale)
    n = merger.bank.n
    x = preds[:n, sup].T  # the task models' support predictions, [support, n]
    sd = x.std(axis=0) + 1e-9
    xs, ys = (x - x.mean(axis=0)) / sd, (y[sup] - y[sup].mean()) / (y[sup].std() + 1e-9)
    default = 1.25 * softmax(zs[rows] / 0.1) @ coef[rows]  # learn's start (init mixes, T = 0.1, ×1.25)
    for lam in ridge:
        w = np.linalg.solve(xs.T @ xs + lam * np.eye(n), xs.T @ ys) / sd  # per unit of each task's prediction
        a = 1.25 * w / np.abs(w).sum()
        out[f"ridge λ={lam:g}"] = merged_alpha(a)
        out[f"ridge λ={lam:g}, its prediction"] = srocc(y[test], w @ preds[:n, test])
        out[f"ridge λ={lam:g}, mean with the default start"] = merged_alpha((a + default) / 2)
    if bags:
        # bagging: the softmax weights averaged over bootstrap resamples of the support set
        rng = np.random.default_rng(len(sup) * 7919 + int(sup.sum()))
        draws = [d for d in (rng.choice(sup, len(sup)) for _ in range(4 * bags)) if len(set(y[d].tolist())) > 1][:bags]
        zb = np.array([[srocc(y[d], p[d]) for p in preds] for d in draws])
        for t in temperatures:
            out[f"mixes, bagged T={t:g}"] = merged(softmax(zb[:, rows] / t, axis=1).mean(axis=0), rows)
    if loo:
        # T chosen per user by leave-one-out over the support set: each rated image is predicted by the
        # softmax over the other ratings' SROCC, as the weighted mean of the candidates' standardised
        # predictions (a proxy for the merge's); the T whose predictions rank the ratings best wins
        ps = preds[rows][:, sup]
        ps = (ps - ps.mean(axis=1, keepdims=True)) / (ps.std(axis=1, keepdims=True) + 1e-9)
        zl = np.array([[srocc(np.delete(y[sup], j), np.delete(p, j)) for p in ps] for j in range(len(sup))])
        grid = [0.03, 0.05, 0.1, 0.2, 0.5, 1.0]
        fit = []
        for t in grid:
            fit.append(srocc(y[sup], (softmax(zl / t, axis=1) * ps.T).sum(axis=1)))
        t = grid[int(np.argmax(fit))]
        out["mixes, T by leave-one-out"] = merged(softmax(zs[rows] / t), rows)
        if chosen is not None:
            chosen.append(t)
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
    ap.add_argument("--bags", type=int, default=0, help="also the mixes' softmax averaged over this many bootstrap resamples")
    ap.add_argument("--loo", action="store_true", help="also the mixes at a T chosen per user by leave-one-out")
    ap.add_argument("--scales", default="", help="also the mixes at T = 0.1 with the start times each of these (e.g. 0.8,1.25)")
    ap.add_argument("--ridge", default="", help="also a ridge-regression start at each of these penalties (e.g. 1,3,10)")
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
        runs, chosen = [], []
        for u, user in enumerate(read_ratings(table, eval_transform(bank.architecture)).supports):
            preds = merger.mix_predictions(user.pixels)
            for trial in range(args.trials):
                sup, test, _ = support_split(len(user.scores), args.seed, u, args.shots, trial)
                if len(set(user.scores[sup].tolist())) < 2:
                    continue
                picks = split_picks(merger, user.pixels, user.scores, preds, sup, test, temperatures, args.bags, args.loo,
                                    chosen, [float(x) for x in args.scales.split(",") if x],
                                    [float(x) for x in args.ridge.split(",") if x])
                runs += [{"user": user.user, "trial": trial, "method": m, "srocc": v} for m, v in picks.items()]
            print(f"{name}: {user.user} done", flush=True)
        summary = {}
        for m in dict.fromkeys(r["method"] for r in runs):  # mean over users per trial, then over trials
            per_trial = [np.mean([r["srocc"] for r in runs if r["method"] == m and r["trial"] == t])
                         for t in range(args.trials)]
            summary[m] = {"mean": float(np.mean(per_trial)), "std": float(np.std(per_trial, ddof=1))}
        result["sets"][name] = {"summary": summary, "runs": runs, **({"loo_temperatures": chosen} if chosen else {})}
        base = summary["tasks, best"]["mean"]
        print(f"\n## {name}, {args.shots} shots, {args.trials} trials: mean test SROCC (vs the best single task)\n")
        for m, s in summary.items():
            print(f"| {m} | {s['mean']:.3f} ± {s['std']:.3f} | {s['mean'] - base:+.3f} |")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
