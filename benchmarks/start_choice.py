"""Issue 15's open lead at 100 shots: let each user's ratings choose between the default recipe (the
mixes start) and the paper's (the adaptive start) by the out-of-fold SROCC of ``--folds`` fold fits of
each on the support set, the fits the default's calibration makes for its own start already.

Per split (a user set's user and trial at K = 100, ``evaluate.support_split`` as ``at_scale.py`` draws
it), both recipes' fold fits run on the support set alone; the split's test SROCC of either recipe is
taken from ``at_scale.py``'s stored runs of the same splits (``<set>-recipe-100-mix-scale1.25.json``
for the default, ``<set>-recipe.json`` for the paper's), so no final fit is repeated here. It prints,
per trial, the default, the paper's recipe, the choice (a tie goes to the default) and the oracle
(the better of the two on the test images).

    python benchmarks/at_scale.py --simulate-only --plan "recipe:100:seed0" --out at-scale-run
    python benchmarks/start_choice.py --data at-scale-run --set seed0 --trials 1,2 --out seed0-start-choice.jsonl
    # 10 fold fits of 80 images per split, about 7.5 min each on one core: 12 users × 3 trials ≈ 2.3 h on 2 cores

A rerun with the same ``--out`` goes on where the last stopped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
from dataclasses import replace
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "at-scale"
K = 100
PAPER = "learned, adaptive init (the paper)"
_STATE: dict = {}


def _unit(job: tuple[str, int, int, int, int]) -> dict:
    """Both recipes' out-of-fold SROCC on one split's support set (a forked worker, one thread)."""
    name, trial, u, folds, steps = job
    import torch

    from laionfilter.evaluate import default_methods, default_name, support_split
    from laionfilter.learn import out_of_fold
    from laionfilter.metrics import srocc
    from laionfilter.recipe import LearnConfig

    torch.set_num_threads(1)
    merger, supports = _STATE["merger"], _STATE["supports"][name]
    sup = supports[u]
    sup_idx, _, trial_seed = support_split(len(sup.scores), _STATE["seed"], u, K, trial)
    base = LearnConfig(steps=steps, device="cpu", calibration="none")
    methods = default_methods(base)
    pixels, y = sup.pixels[sup_idx], sup.scores[sup_idx]
    task_preds = merger.task_predictions(pixels)
    row = {"set": name, "trial": trial, "user_index": u, "user": sup.user, "folds": folds}
    for recipe, cfg in (("default", methods[default_name(base)]), ("paper", methods[PAPER])):
        cfg = replace(cfg, seed=trial_seed, folds=folds)
        row[f"{recipe}_oof_srocc"] = srocc(y, out_of_fold(merger, pixels, y, cfg, task_preds=task_preds)[cfg.steps])
    return row


def summarise(rows: list[dict], name: str) -> dict:
    """Per trial: mean test SROCC of the default, the paper's recipe, the choice and the oracle."""
    def test(file: str, method: str | None) -> dict:
        return {(r["trial"], r["user"]): r["srocc"] for r in json.loads((RESULTS / file).read_text())["runs"]
                if r["shots"] == K and (method is None or r["method"] == method)}
    default, paper = test(f"{name}-recipe-100-mix-scale1.25.json", None), test(f"{name}-recipe.json", PAPER)
    out = {}
    for trial in sorted({r["trial"] for r in rows}):
        mine = [r for r in rows if r["trial"] == trial]
        d = np.array([default[trial, r["user"]] for r in mine])
        p = np.array([paper[trial, r["user"]] for r in mine])
        chose_paper = np.array([r["paper_oof_srocc"] > r["default_oof_srocc"] for r in mine])
        chosen = np.where(chose_paper, p, d)
        out[trial] = {"users": len(mine), "default": d.mean(), "paper": p.mean(), "chosen": chosen.mean(),
                      "oracle": np.maximum(d, p).mean(), "paper_chosen": int(chose_paper.sum()),
                      "chosen_better": int((chosen > d).sum()), "chosen_worse": int((chosen < d).sum())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="at_scale.py's --out (its user sets)")
    ap.add_argument("--set", default="seed0")
    ap.add_argument("--trials", default="0,1,2")
    ap.add_argument("--users", type=int, default=12)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0, help="the split seed, as at_scale.py's")
    ap.add_argument("--workers", type=int, default=max(1, mp.cpu_count()))
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, one per split")
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    done = {(r["trial"], r["user_index"]) for r in rows if r["folds"] == args.folds}
    todo = [(args.set, t, u, args.folds, args.steps) for t in map(int, args.trials.split(","))
            for u in range(args.users) if (t, u) not in done]
    if todo:
        from laionfilter.bank import resolve_bank
        from laionfilter.learn import Merger
        from laionfilter.model import eval_transform
        from laionfilter.ratings import read_ratings

        bank = resolve_bank("starter")
        # read once here and shared with the forked workers
        _STATE.update(merger=Merger(bank, "cpu"), seed=args.seed, supports={
            args.set: read_ratings(args.data / f"data-{args.set}" / "ratings.csv", eval_transform(bank.architecture)).supports})
        with mp.get_context("fork").Pool(args.workers) as pool, open(args.out, "a") as log:
            for row in pool.imap_unordered(_unit, todo):
                log.write(json.dumps(row) + "\n")
                log.flush()
                rows.append(row)
                print(f"trial {row['trial']} {row['user']}: out-of-fold SROCC default {row['default_oof_srocc']:.3f}, "
                      f"paper {row['paper_oof_srocc']:.3f}", flush=True)
    for trial, s in summarise([r for r in rows if r["folds"] == args.folds], args.set).items():
        print(f"trial {trial} ({s['users']} users): default {s['default']:.4f}, paper {s['paper']:.4f}, chosen "
              f"{s['chosen']:.4f} (the paper's for {s['paper_chosen']}; better than the default for "
              f"{s['chosen_better']}, worse for {s['chosen_worse']}), oracle {s['oracle']:.4f}")


if __name__ == "__main__":
    main()
