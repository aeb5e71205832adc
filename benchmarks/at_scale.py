"""Issue 15's figures at scale: `evaluate`'s protocol split into units that worker processes share.

A unit is one (user set, kind, K, trial, user): `evaluate.split_runs` (kind `recipe`: the zero-shot
baselines, merged at init, the paper's recipe and the default recipe; kind `calibration`: the default
recipe with its calibration, for the rating MAE) or `evaluate.selection_runs` (kind `select`: the
``--selections`` at K, random against active by default). Units are seeded by their own numbers, so a unit gives the
same runs whichever worker takes it and whatever else runs. Workers take units from one queue in the
plan's order, trial by trial, so that a run stopped by ``--deadline`` leaves whole trials rather than
whole users; only trials that every user of a set finished are summarised.

Kind `recipe` runs the default recipe without its calibration: calibration changes no score, so no
SROCC, and its out-of-fold fits cost five fits more per unit; kind `calibration` pays for them, and
its SROCC equals the recipe kind's default (the same final fit).

    python benchmarks/at_scale.py --users 12 --trials 3 --workers 2 --out /tmp/at-scale \\
        --plan "recipe:10:seed0,seed1;recipe:10:against2;select:10:seed0,seed1;recipe:100:seed0,seed1,against2"
    python benchmarks/at_scale.py ... --plan "calibration:10:seed0,seed1;select:10:seed0,seed1" --selections active+fit
    python benchmarks/at_scale.py ... --plan "recipe:10:seed0" --override "mix_temperature=0.05"

Runs before the default became ``init=mixes;anchor=23.71;anchor_power=4`` used
``init=mixes;anchor=31.62;anchor_power=3``, and before that ``init=adaptive;anchor=10;anchor_power=1.5``:
add those to ``--override`` to rerun them.

writes ``<set>-<kind>.json`` (evaluate's result format, plus ``complete_trials``) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import re
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from personalize import simulate_users  # noqa: E402 (the benchmark's simulated users, one definition)

from laionfilter.evaluate import (BEST_SINGLE, ZERO_SHOT, default_methods, default_name, markdown_table,  # noqa: E402
                                  selection_runs, split_runs, summarise)
from laionfilter.recipe import LearnConfig  # noqa: E402
from laionfilter.safefiles import write_json  # noqa: E402

KEEP = (ZERO_SHOT, BEST_SINGLE, "merged at init (adaptive, 0 steps)", "learned, adaptive init (the paper)")


def _parse(default: Any, value: str) -> Any:
    """A field's value from text, typed like the field's default (a tuple as numbers joined by '/')."""
    return tuple(int(v) for v in value.split("/")) if isinstance(default, tuple) else type(default)(value)


def _base(steps: int, device: str) -> LearnConfig:
    """The default recipe as kind `recipe` runs it (without calibration, which changes no score)."""
    return LearnConfig(steps=steps, device=device, calibration="none")


def recipe_methods(steps: int, device: str, override: str = "") -> dict[str, LearnConfig | str]:
    """The baselines, the paper's recipe and the default recipe; with ``override`` (``field=value;...``),
    the default recipe changed so, alone (the others' numbers do not depend on it: same splits)."""
    base = _base(steps, device)
    methods = default_methods(base)
    default = default_name(base)
    if override:
        fields = {k: _parse(getattr(base, k), v) for k, v in (kv.split("=", 1) for kv in override.split(";"))}
        changed = replace(methods[default], **fields)
        return {f"{default_name(changed)}, {override}": changed}  # named for what runs, not for today's default
    return {k: v for k, v in methods.items() if k in KEEP or k == default}


def calibration_methods(steps: int, device: str) -> dict[str, LearnConfig | str]:
    methods = recipe_methods(steps, device)
    name = default_name(_base(steps, device))
    return {f"{name}, calibrated": replace(methods[name], calibration=LearnConfig().calibration)}


KINDS = ("recipe", "calibration", "select")


def parse_plan(plan: str) -> list[tuple[str, int, list[str]]]:
    phases = []
    for part in filter(None, (p.strip() for p in plan.split(";"))):
        m = re.fullmatch(rf"({'|'.join(KINDS)}):(\d+):([a-z0-9,]+)", part)
        if not m:
            raise SystemExit(f"--plan: {part!r} is not kind:K:set,set (kind {', '.join(KINDS)})")
        phases.append((m[1], int(m[2]), m[3].split(",")))
    return phases


def set_seed(name: str) -> tuple[int, bool]:
    m = re.fullmatch(r"(seed|against)(\d+)", name)
    if not m:
        raise SystemExit(f"user set {name!r}: use seedN or againstN")
    return int(m[2]), m[1] == "against"


def _simulate(job: tuple[Path, int, int, str]) -> str:
    out, users, images, name = job
    seed, against = set_seed(name)
    done = out / f"data-{name}" / "ratings.csv"
    if done.exists():  # written last, from the same seed: the set is whole
        return str(done)
    return str(simulate_users(out / f"data-{name}", users, images, seed, against))


def worker(rank: int, device: str, units: Any, args: argparse.Namespace, tables: dict[str, str]) -> None:
    from laionfilter.bank import resolve_bank
    from laionfilter.jobs import learning_threads
    from laionfilter.learn import Merger
    from laionfilter.model import eval_transform, pick_device
    from laionfilter.ratings import read_ratings

    bank = resolve_bank(args.bank)
    dev = pick_device(device)
    with learning_threads(bank, 1), open(args.out / "parts" / f"w{rank:02d}.jsonl", "a") as log:
        merger = Merger(bank, dev)
        supports: dict[str, list] = {}
        preds: dict[tuple[str, int], np.ndarray] = {}
        methods = {"recipe": recipe_methods(args.steps, str(dev), args.override),
                   "calibration": calibration_methods(args.steps, str(dev))}
        while True:
            if not mp.parent_process().is_alive():  # the run was killed: nobody would collect another unit
                return
            try:
                kind, name, k, trial, u = units.get_nowait()
            except queue.Empty:
                return
            if name not in supports:
                supports[name] = read_ratings(tables[name], eval_transform(bank.architecture)).supports
            sup = supports[name][u]
            if (name, u) not in preds:
                preds[name, u] = merger.task_predictions(sup.pixels)
            started = time.time()
            if kind in methods:
                runs = split_runs(merger, sup, u, k, trial, methods[kind], args.seed, preds[name, u])
            else:
                runs = selection_runs(merger, sup, u, trial, k, tuple(args.selections.split(",")),
                                      LearnConfig(steps=args.steps, device=str(dev)), args.seed, preds[name, u])
            log.write(json.dumps({"set": name, "kind": kind, "shots": k, "trial": trial, "user_index": u,
                                  "device": str(dev), "seconds": round(time.time() - started, 2), "runs": runs}) + "\n")
            log.flush()


def collect(args: argparse.Namespace, phases) -> dict[str, Any]:
    units = [json.loads(line) for f in sorted((args.out / "parts").glob("w*.jsonl")) for line in f.read_text().splitlines()]
    out = {}
    for kind in KINDS:
        for name in dict.fromkeys(s for p in phases for s in p[2]):
            mine = [u for u in units if u["set"] == name and u["kind"] == kind]
            if not mine:
                continue
            runs, complete = [], {}
            for k in sorted({u["shots"] for u in mine}):
                by_trial = {}
                for u in mine:
                    if u["shots"] == k:
                        by_trial.setdefault(u["trial"], []).append(u)
                done = sorted(t for t, us in by_trial.items() if len({u["user_index"] for u in us}) == args.users)
                complete[str(k)] = done
                runs += [r for u in mine if u["shots"] == k and u["trial"] in done for r in u["runs"]]
            methods = {"recipe": list(recipe_methods(args.steps, "cpu", args.override)),
                       "calibration": list(calibration_methods(args.steps, "cpu")),
                       "select": args.selections.split(",")}[kind]
            result = {"set": name, "kind": kind, "users": args.users, "shots": sorted({u["shots"] for u in mine}),
                      "complete_trials": complete, "units_done": len(mine),
                      "unit_seconds": {d: round(sum(u["seconds"] for u in mine if u["device"] == d), 1)
                                       for d in sorted({u["device"] for u in mine})},
                      "methods": {m: m for m in methods}, "summary": summarise(runs) if runs else [], "runs": runs}
            write_json(args.out / f"{name}-{kind}.json", result)
            out[f"{name}-{kind}"] = result
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default="recipe:10:seed0,seed1", help="phases kind:K:set,set separated by ';', run in order")
    ap.add_argument("--users", type=int, default=12)
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--only-trials", default="", help="run only these of the trials, e.g. '1,2' where trial 0 "
                    "was run before (each trial's splits are its own, whichever others run)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0, help="the split seed (the user sets have their own)")
    ap.add_argument("--bank", default="starter")
    ap.add_argument("--workers", type=int, default=max(1, mp.cpu_count() - 1), help="processes, one thread each")
    ap.add_argument("--cuda-workers", type=int, default=0, help="how many of the workers learn on the GPU")
    ap.add_argument("--deadline", type=float, default=None, help="stop the workers after this many seconds")
    ap.add_argument("--override", default="", help="run only the default recipe, changed so: field=value;... "
                    "(e.g. 'temperature=0.1;steps_from=0/500'); compare with a run without it into another --out")
    ap.add_argument("--selections", default="random,active", help="kind select: the selections compared "
                    "(evaluate.SELECTIONS; each unit's numbers do not depend on the others chosen)")
    ap.add_argument("--simulate-only", action="store_true", help="write the user sets and stop")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    phases = parse_plan(args.plan)
    started = time.time()
    (args.out / "parts").mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    names = list(dict.fromkeys(s for p in phases for s in p[2]))
    with ctx.Pool(min(len(names), args.workers)) as pool:
        tables = dict(zip(names, pool.map(_simulate, [(args.out, args.users, args.images, n) for n in names])))
    print(f"{len(names)} user sets simulated in {time.time() - started:.0f} s", flush=True)
    if args.simulate_only:
        return
    done = {(u["kind"], u["set"], u["shots"], u["trial"], u["user_index"])
            for f in (args.out / "parts").glob("w*.jsonl") for u in map(json.loads, f.read_text().splitlines())}
    units = ctx.Queue()
    trials = [int(t) for t in args.only_trials.split(",")] if args.only_trials else range(args.trials)
    todo = [(kind, name, k, trial, u) for kind, k, sets in phases for trial in trials
            for name in sets for u in range(args.users)]
    todo = [t for t in todo if t not in done]  # a rerun into the same --out goes on where the last stopped
    for t in todo:
        units.put(t)
    print(f"{len(todo)} units ({len(done)} done before) on {args.workers} workers", flush=True)
    procs = [ctx.Process(target=worker, args=(r, "cuda" if r < args.cuda_workers else "cpu", units, args, tables))
             for r in range(args.workers)]
    # A plain `kill` of this process stops its workers too (below), rather than leaving them to run on
    # beside whatever is measured next.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for p in procs:
        p.start()
    end = started + args.deadline if args.deadline else None
    try:
        for p in procs:
            p.join(None if end is None else max(0.0, end - time.time()))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    results = collect(args, phases)
    for key, r in results.items():
        print(f"\n## {key}: complete trials per K {r['complete_trials']} of {args.users} users; "
              f"unit seconds by device {r['unit_seconds']}\n")
        if r["summary"]:
            print(markdown_table(r))
    print(f"\n{time.time() - started:.0f} s in all; every number in {args.out}")


if __name__ == "__main__":
    main()
