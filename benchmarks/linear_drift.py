"""Where the linear fit parts from the paper's: how well each expansion predicts the model at the next.

For the first users of a population (benchmarks/populations.py's data), each with ``--shots`` rated
images and the rest held out: the paper's fit and the linear fit at each ``--refresh`` interval, and
for each, the real model's Bradley–Terry loss on the rated images at the end (all pairs), the held-out
SROCC, how far α moved from its start, and, for a linear fit, the SROCC between each expansion's
prediction at the next expansion's point and the model's own scores there (1.0: the linear model
held over the interval).

    python benchmarks/populations.py --populations sealed --sealed-seed 41204 ...   # makes the data
    python benchmarks/linear_drift.py --population sealed --users 3 --refresh 100,25,10 --json drift.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from laionfilter.bank import resolve_bank
from laionfilter.learn import fit
from laionfilter.merger import Merger
from laionfilter.metrics import srocc
from laionfilter.model import eval_transform
from laionfilter.objective import Scored
from laionfilter.ratings import read_ratings
from laionfilter.recipe import LearnConfig


def support_loss(merger: Merger, alpha: torch.Tensor, support: Scored) -> float:
    """The model's mean Bradley–Terry loss over every ordered pair of the support."""
    s = torch.as_tensor(merger.predict(alpha, support.pixels))
    y = torch.as_tensor(np.asarray(support.scores, dtype=np.float32))
    a, b = torch.nonzero(y[:, None] > y[None, :], as_tuple=True)
    return float(torch.nn.functional.softplus(-(s[a] - s[b])).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--population", default="sealed")
    ap.add_argument("--data", type=Path, default=Path("benchmarks/results/populations-data"))
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--shots", type=int, default=100)
    ap.add_argument("--refresh", default="100,25,10")
    ap.add_argument("--drift", default="", help="also the linear fit refreshed on these moves (LearnConfig.drift)")
    ap.add_argument("--no-backprop", action="store_true", help="leave out the paper's fit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bank = resolve_bank("starter")
    merger = Merger(bank, torch.device("cpu"))
    table = args.data / args.population / "data" / "ratings.csv"
    supports = read_ratings(table, eval_transform(bank.architecture)).supports[:args.users]
    base = LearnConfig(device="cpu", calibration="none")
    methods = {"backprop": base, **{f"linear, refresh {r}": replace(base, fit="linear", refresh=int(r))
                                    for r in args.refresh.split(",") if r}}
    methods.update({f"linear, drift {d}": replace(base, fit="linear", drift=float(d)) for d in args.drift.split(",") if d})
    methods = {k: v for k, v in methods.items() if k != "backprop" or not args.no_backprop}
    rows = []
    for u, sup in enumerate(supports):
        order = np.random.default_rng(u).permutation(len(sup.pixels))
        train, test = order[:args.shots], order[args.shots:]
        support = Scored(sup.pixels[train], np.asarray(sup.scores)[train])
        row = {"user": sup.user}
        for name, cfg in methods.items():
            t = time.time()
            f = fit(merger, support, cfg)
            row[name] = {"seconds": round(time.time() - t, 1), "support_loss": round(support_loss(merger, f.alpha, support), 4),
                         "test_srocc": round(srocc(np.asarray(sup.scores)[test], merger.predict(f.alpha, sup.pixels[test])), 4),
                         "mean_abs_move": round(float((f.alpha - f.alpha_init).abs().mean()), 4)}
            lins = f.linearisations
            if lins:
                row[name]["passes"] = len(lins)
                row[name]["next_point_srocc"] = [round(srocc(b.scores.numpy(), a(b.alpha).detach().numpy()), 3)
                                                 for a, b in zip(lins[:-1], lins[1:])]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"population": args.population, "shots": args.shots, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
