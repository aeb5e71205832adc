"""What `learn` costs on real-size banks: time by phase and peak memory, ViT-B-16 and ViT-L-14.

A bank is made in the paper authors' layout (six clip_{B,L}_3fc_*.pth files of random weights, as
`benchmarks/import_bank.py` makes them; time and memory do not depend on the values) and imported with
`bank import`. Then, for each ratings count (10 and 100 images, JPEGs of 256 pixels, random scores),
a fresh process measures the default recipe's phases:
  load      the bank read, the merger built (θ_pre and the task vectors on the device);
  decode    the ratings file read and every image preprocessed;
  start     the task models' predictions (the adaptive start);
  linearise one forward and backward per image, merged once (fit "linear" makes one per refresh);
  backprop  ``--steps`` Adam steps of the paper's fit, no early stop: seconds per step;
and, with ``--full ARCH:N``, in a fresh process of its own, `learn` itself end to end with each
``--fit`` and ``--tune`` (the final fit, the out-of-fold fits, the calibration): its wall time and the process's peak
resident memory (VmHWM), and on a GPU its peak allocated device memory.

``--direct`` writes the bank with ``bank.write_bank`` from random task vectors instead of making and
importing .pth files: the same bank layout, for a lent GPU machine, where writing and importing 10 GB of
ViT-L-14 checkpoints would spend much of the lease.

``--users N`` instead measures many users at once on the starter bank: N users, each rating 10 images
drawn from a pool of 2,000 crops of the bank's reserved photos (scores from a random linear taste over
simple image statistics), learned by one `learn` (the default recipe, or ``--fit``/``--drift``); its wall time, and for
``--alone K`` of them, each learned alone: the largest difference of coefficients and of SROCC on the
user's test images (another 100 of the pool, rated by the same taste) between the two.

    python benchmarks/learn_cost.py --arch ViT-B-16 --ratings 10 --steps 5 --json learn-cost.json
    python benchmarks/learn_cost.py --full ViT-B-16:10 --no-phases --json learn-cost-default.json
    python benchmarks/learn_cost.py --device cuda --direct --full ViT-B-16:10 --json learn-cost-gpu.json
    python benchmarks/learn_cost.py --users 1000 --json benchmarks/results/learn-users-epyc.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from import_bank import make_files  # noqa: E402

from laionfilter.recipe import FITS, LearnConfig  # noqa: E402  (no torch: the runs import it in their own processes)

RECIPE = LearnConfig()

CHILD = r"""
import json, re, sys, time
t0 = time.perf_counter()
import torch
from dataclasses import replace
from laionfilter.bank import load_bank
from laionfilter.learn import fit, learn_device
from laionfilter.merger import Merger
from laionfilter.model import eval_transform
from laionfilter.objective import Scored
from laionfilter.ratings import read_ratings
from laionfilter.recipe import LearnConfig
bank_path, ratings, device, steps, full, fit_name, tune, drift = (sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                                                 sys.argv[5] == "1", sys.argv[6], sys.argv[7], float(sys.argv[8]))
def hwm():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()
out = {"import_s": round(time.perf_counter() - t0, 2)}
cfg = LearnConfig(device=device, fit=fit_name, tune=tune, drift=drift)
t = time.perf_counter(); bank = load_bank(bank_path); merger = None if full else Merger(bank, learn_device(cfg)); sync()
out["load_s"] = round(time.perf_counter() - t, 2)
if full:  # learn alone in this process, so that its peak memory is its own
    from laionfilter.profile import learn_profiles
    t = time.perf_counter()
    passes = []
    linearise = Merger.linearise
    Merger.linearise = lambda self, *a, **k: passes.append(1) or linearise(self, *a, **k)  # counted, not changed
    learn_profiles(ratings, bank, ratings + ".profile", cfg, progress=False)
    if fit_name == "linear":
        out["passes"] = len(passes)
    out["learn_s"] = round(time.perf_counter() - t, 1)
    out["end_to_end_s"] = round(time.perf_counter() - t0, 1)  # the imports and the bank's load too
    out["peak_rss_mib"] = round(hwm())
    if device.startswith("cuda"):
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    print(json.dumps(out))
    sys.exit()
t = time.perf_counter(); sup = read_ratings(ratings, eval_transform(bank.architecture)).supports[0]
out["decode_s"] = round(time.perf_counter() - t, 2)
support = Scored(sup.pixels, sup.scores)
t = time.perf_counter(); task_preds = merger.task_predictions(sup.pixels); sync()
out["start_s"] = round(time.perf_counter() - t, 2)
t = time.perf_counter(); merger.linearise(torch.full((bank.n, len(bank.layers)), 1 / bank.n), sup.pixels); sync()
out["linearise_s_per_image"] = round((time.perf_counter() - t) / len(sup.pixels), 3)
backprop = LearnConfig(device=device, steps=steps, fit="backprop", calibration="none")
fit(merger, support, replace(backprop, steps=1), task_preds=task_preds)
sync(); t = time.perf_counter()
fit(merger, support, backprop, task_preds=task_preds); sync()
out["backprop_s_per_step"] = round((time.perf_counter() - t) / steps, 3)
out["peak_rss_mib_phases"] = round(hwm())
print(json.dumps(out))
"""


def ratings_file(root: Path, n: int) -> Path:
    from laionfilter.train.starter import PHOTOS, load_photo, random_crop

    rng = np.random.default_rng(n)
    photos = [load_photo(p) for p in PHOTOS["eval"]]
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = ["image,score"]
    for i in range(n):
        random_crop(photos[i % len(photos)], 256, rng).save(root / "img" / f"{i:03d}.jpg", quality=90)
        lines.append(f"img/{i:03d}.jpg,{int(rng.integers(1, 11))}")
    (root / f"ratings-{n}.csv").write_text("\n".join(lines) + "\n")
    return root / f"ratings-{n}.csv"


def direct_bank(out: Path, arch: str, n: int = 6) -> None:
    """A bank of ``n`` random task vectors (float16, as `bank import` stores them), written directly."""
    import torch

    from laionfilter.authors import authors_preprocess
    from laionfilter.bank import write_bank
    from laionfilter.model import SCALES, layer_names, load_base_clip, model_state
    from laionfilter.safefiles import state_fingerprint

    torch.manual_seed(0)
    architecture, model, _ = load_base_clip(arch)
    pre, layers = model_state(model), layer_names(model)
    tau = {l: (1e-3 * torch.randn(n, *pre[l].shape)).half() for l in layers}
    architecture = replace(architecture, preprocess=authors_preprocess(architecture.preprocess["size"][0]))
    tasks = [{"name": f"t{i}", "database": f"t{i}", "scale": "1-10", "template": list(SCALES["1-10"]),
              "metrics": {"val_srocc": None, "val_plcc": None}, "source": "random", "source_sha256": "0" * 64}
             for i in range(n)]
    base = {"spec": arch, "fingerprint": state_fingerprint({l: pre[l] for l in layers if l.startswith("visual.")})}
    write_bank(out, architecture, base, layers, pre, tau, "float16", tasks)


USERS_CHILD = r"""
import json, re, sys, time
t0 = time.perf_counter()
from laionfilter.bank import resolve_bank
from laionfilter.profile import learn_profiles
from laionfilter.recipe import LearnConfig
table, out, fit_name, drift = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
t = time.perf_counter()
profiles = learn_profiles(table, resolve_bank("starter"), out, LearnConfig(device="cpu", fit=fit_name, drift=drift),
                          progress=False)
print(json.dumps({"import_s": round(t - t0, 2), "learn_s": round(time.perf_counter() - t, 1), "profiles": len(profiles),
                  "peak_rss_mib": round(int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024)}))
"""


def users_table(root: Path, users: int, pool: int = 2000, per_user: int = 10, test: int = 100) -> tuple[Path, dict]:
    """``users`` users × ``per_user`` ratings from a pool of crops; also each user's test images and scores."""
    from laionfilter.train.starter import PHOTOS, image_stats, load_photo, random_crop

    rng = np.random.default_rng(0)
    photos = [load_photo(p) for p in PHOTOS["eval"]]
    (root / "pool").mkdir(parents=True, exist_ok=True)
    stats = []
    for i in range(pool):
        img = random_crop(photos[i % len(photos)], 64, rng)
        img.save(root / "pool" / f"{i:04d}.png")
        stats.append(image_stats(img))
    stats = np.array(stats)
    stats = (stats - stats.mean(0)) / (stats.std(0) + 1e-9)
    lines, tests = ["user,image,score"], {}
    for u in range(users):
        taste = rng.normal(size=stats.shape[1])
        picked = rng.choice(pool, per_user + test, replace=False)
        raw = stats[picked] @ taste
        scores = np.clip(np.round(5.5 + 4.5 * (raw - raw.mean()) / (raw.std() + 1e-9) / 2), 1, 10).astype(int)
        user = f"u{u:04d}"
        lines += [f"{user},pool/{i:04d}.png,{s}" for i, s in zip(picked[:per_user], scores[:per_user])]
        tests[user] = (picked[per_user:], scores[per_user:])
    (root / "users.csv").write_text("\n".join(lines) + "\n")
    return root / "users.csv", tests


def many_users(users: int, alone: int, work: Path, cfg) -> dict:
    import torch

    from laionfilter.bank import resolve_bank
    from laionfilter.learn import fit_recipe
    from laionfilter.merger import Merger
    from laionfilter.metrics import srocc
    from laionfilter.model import eval_transform
    from laionfilter.objective import Scored
    from laionfilter.profile import load_profile
    from laionfilter.ratings import read_ratings

    table, tests = users_table(work, users)
    r = subprocess.run([sys.executable, "-c", USERS_CHILD, str(table), str(work / "profiles"), cfg.fit, str(cfg.drift)],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"learn failed: {r.stderr[-2000:]}")
    row = {"users": users, "ratings_per_user": 10, "pool": 2000, "fit": cfg.fit, "drift": cfg.drift, **json.loads(r.stdout.strip().splitlines()[-1])}
    row["seconds_per_user"] = round(row["learn_s"] / users, 3)
    steps = [load_profile(p).meta.get("linearised_at", []) for p in sorted((work / "profiles").glob("*.profile"))]
    if any(steps):  # a linear fit's passes per user (its final fit's; the out-of-fold fits replay them)
        passes = np.array([len(s) for s in steps])
        early = sum(1 for s in steps for k in s if k < 150) / passes.sum()
        row.update(passes_per_user={"min": int(passes.min()), "median": float(np.median(passes)),
                                    "max": int(passes.max())}, share_of_passes_before_step_150=round(early, 3))
    bank = resolve_bank("starter")
    transform = eval_transform(bank.architecture)
    merger = Merger(bank, torch.device("cpu"))
    supports = read_ratings(table, transform).supports[:alone]
    diffs, dsrocc = [], []
    torch.set_num_threads(1)
    for sup in supports:
        one = fit_recipe(merger, Scored(sup.pixels, sup.scores), cfg)
        together = load_profile(work / "profiles" / f"{sup.user}.profile")
        idx, y = tests[sup.user]
        px = torch.stack([transform(work / "pool" / f"{i:04d}.png") for i in idx])
        diffs.append(float((one.alpha - together.alpha).abs().max()))
        dsrocc.append(abs(srocc(y, merger.predict(one.alpha, px)) - srocc(y, merger.predict(together.alpha, px))))
    row.update(alone_checked=len(supports), max_alpha_difference=max(diffs), max_test_srocc_difference=max(dsrocc))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", help="ViT-B-16 and/or ViT-L-14 (default: both)")
    ap.add_argument("--ratings", action="append", type=int, help="ratings counts (default: 10 and 100)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=10, help="Adam steps timed per fit")
    ap.add_argument("--full", action="append", default=[], metavar="ARCH:N",
                    help="also run `learn` with the default recipe end to end for this bank and ratings count "
                         "(e.g. ViT-B-16:10)")
    ap.add_argument("--fit", action="append", choices=FITS,
                    help=f"the fits of the --full and --users runs (default: {RECIPE.fit}, the default recipe's)")
    ap.add_argument("--tune", action="append", help="the --tune values of the --full runs (default: all)")
    ap.add_argument("--drift", type=float, default=RECIPE.drift,
                    help="LearnConfig.drift of the --fit linear runs (default: the default recipe's)")
    ap.add_argument("--direct", action="store_true", help="write the bank directly (random task vectors)")
    ap.add_argument("--no-phases", action="store_true", help="only the --full runs")
    ap.add_argument("--users", type=int, help="instead: this many users at once on the starter bank")
    ap.add_argument("--alone", type=int, default=20, help="--users: how many of them to learn alone as well")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lf-learn-cost-"))
    if args.users:
        row = many_users(args.users, args.alone, work,
                         LearnConfig(device="cpu", fit=(args.fit or [RECIPE.fit])[0], drift=args.drift))
        print(json.dumps(row))
        if args.json:
            args.json.write_text(json.dumps(row, indent=1) + "\n")
        return
    res: dict = {"device": args.device, "steps_timed": args.steps, "runs": []}
    for arch in args.arch or ["ViT-B-16", "ViT-L-14"]:
        t = time.time()
        bank = work / arch / "bank"
        if args.direct and not (bank / "manifest.json").exists():
            direct_bank(bank, arch)
        elif not (bank / "manifest.json").exists():
            base, files = make_files(work / arch, 6, arch)
            r = subprocess.run([sys.executable, "-m", "laionfilter", "bank", "import", *map(str, files), "--base", base,
                                "--out", str(bank)], capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"bank import failed: {r.stderr[-2000:]}")
        print(f"{arch}: bank ready in {time.time() - t:.0f} s", flush=True)
        for n in args.ratings or [10, 100]:
            ratings = ratings_file(work / arch, n)
            row = {"arch": arch, "ratings": n}
            res["runs"].append(row)
            runs = [] if args.no_phases else [("0", "linear", "all")]
            if f"{arch}:{n}" in args.full:
                runs += [("1", f, t) for f in args.fit or [RECIPE.fit] for t in args.tune or ["all"]]
            for full, fit_name, tune in runs:
                r = subprocess.run([sys.executable, "-c", CHILD, str(bank), str(ratings), args.device, str(args.steps),
                                    full, fit_name, tune, str(args.drift)], capture_output=True, text=True)
                got = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-2000:]}
                drifts = fit_name == "linear" and args.drift
                key = f"full_{fit_name}" + ("" if tune == "all" else f"_tune_{tune}") + (f"_drift_{args.drift}" if drifts else "")
                row.update(got if full == "0" else {key: got})
                print(json.dumps(row), flush=True)
                if args.json:  # after every run, so that a stopped benchmark keeps what it measured
                    args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
