"""How learning's thread count behaves on a busy machine (issue: learn/evaluate collapse under contention).

One 100-step fit of a 10-image support set on the starter bank, in a fresh process, for each setting:
alone, and beside a competing process that keeps every core busy with torch matmuls (default threads),
as another user's job or a second laionfilter would. Settings: torch's default thread count, one thread,
and the default thread count with OpenMP told to sleep rather than spin while waiting
(OMP_WAIT_POLICY=PASSIVE). Each time is the median of --repeats runs, measured side by side here.

    python benchmarks/threads.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FIT = r"""
import os, sys, time
import numpy as np, torch
threads = int(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
from laionfilter.bank import resolve_bank
from laionfilter.learn import fit
from laionfilter.merger import Merger
from laionfilter.objective import Scored
from laionfilter.recipe import LearnConfig
bank = resolve_bank("starter")
g = torch.Generator().manual_seed(0)
pixels = torch.randn(10, 3, 64, 64, generator=g)
scores = np.arange(10, dtype=float)
merger = Merger(bank, torch.device("cpu"))
t = time.perf_counter()
r = fit(merger, Scored(pixels, scores), LearnConfig(steps=100, device="cpu", fit="backprop"))
print(time.perf_counter() - t, float(r.alpha.sum()))
"""

HOG = r"""
import time, torch
a = torch.randn(512, 512)
end = time.time() + float(__import__("sys").argv[1])
while time.time() < end:
    a = torch.tanh(a @ a)
"""


def run_fit(threads: int, env: dict[str, str]) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", FIT, str(threads)], env=env, capture_output=True, text=True, check=True)
    seconds, alpha_sum = out.stdout.split()
    return float(seconds), float(alpha_sum)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    settings = {"default threads": (0, base), "1 thread": (1, base),
                "default threads, OMP_WAIT_POLICY=PASSIVE": (0, {**base, "OMP_WAIT_POLICY": "PASSIVE"})}
    results = {}
    for busy in (False, True):
        for name, (threads, env) in settings.items():
            times, sums = [], []
            for _ in range(args.repeats):
                hog = subprocess.Popen([sys.executable, "-c", HOG, "900"], env=base) if busy else None
                try:
                    if hog:
                        time.sleep(3)  # let the competitor start its threads
                    s, a = run_fit(threads, env)
                finally:
                    if hog:
                        hog.kill()
                        hog.wait()
                times.append(s)
                sums.append(a)
            key = f"{'busy' if busy else 'alone'}, {name}"
            results[key] = {"median_s": round(statistics.median(times), 2), "runs_s": [round(t, 2) for t in times],
                            "alpha_sum": sums[0]}
            print(f"{key:55s} {statistics.median(times):7.2f} s  (runs {', '.join(f'{t:.1f}' for t in times)})",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
