"""Peak resident memory of scoring with ViT-B-16 and one profile, against what the model alone needs.

Each measurement runs in a fresh process, side by side in one run:
  (a) the model alone: open_clip's ViT-B-16 visual tower built (random weights), then one forward of a
      batch of 32 images: its resident memory (VmRSS) after that, and its peak during the batch (the
      peak counter is reset after building, since open_clip builds the text tower on the way);
  (b) `score_shards` with one profile on a ViT-B-16 bank (two random tasks; `benchmarks/score.py`'s),
      one process (workers 0, batch 32): its peak resident memory (VmHWM);
  (c) the same with the bank's tensors read whole into memory first, as banks were loaded before
      they were read layer by layer: what the lazy reading saves;
  (d) (b) under glibc's MALLOC_MMAP_THRESHOLD_=1048576: the memory it saves and the speed it costs;
  (e) (b) with a 4 MiB threshold and transparent huge pages for malloc's mappings
      (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, glibc ≥ 2.35), so that a mapped block faults in 2 MiB
      pages rather than 4 KiB ones: most of (d)'s memory for less of its time.

    python benchmarks/memory.py --json benchmarks/results/memory.json     # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from score import make_shards, profiles_for, random_bank  # noqa: E402

MODEL_ALONE = """
import torch, open_clip
torch.set_num_threads(1)
tower = open_clip.create_model("ViT-B-16").visual.eval()
x = torch.randn(32, 3, 224, 224)
built = rss()
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM: the peak from here on is the batch's
with torch.inference_mode():
    tower(x)
print(json.dumps({"rss_mib": rss(), "peak_mib": rss("VmHWM"), "built_mib": built}))
"""

SCORE = """
import torch
torch.set_num_threads(1)
from laionfilter.bank import Bank, load_bank
from laionfilter.score import ScoreConfig, score_shards
bank = load_bank(BANK)
if EAGER:
    bank = Bank(bank.path, bank.manifest, dict(bank.pre), dict(bank.tau))
    for t in (*bank.pre.values(), *bank.tau.values()):
        t.add_(0)  # touch every page, as a bank read whole was
s = score_shards(SHARDS, [PROFILE], OUT, bank=bank, cfg=ScoreConfig(workers=0, batch_size=32, device="cpu",
                 overwrite=True), progress=False)
assert s["scored"] == s["samples"] > 0, s
print(json.dumps({"rss_mib": rss(), "peak_mib": rss("VmHWM"), "images_per_second": s["images_per_second"]}))
"""

PRELUDE = """
import json
def rss(field="VmRSS"):  # VmHWM: the peak (ru_maxrss would carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
"""


# glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so activations
# come from the heap and what they leave stays resident; a fixed threshold returns them at once,
# at the price of a page fault for every large allocation: the trade-off, measured.
FIXED_MMAP = "MALLOC_MMAP_THRESHOLD_=1048576"
HUGE_MMAP = {"MALLOC_MMAP_THRESHOLD_": "4194304", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def measure(code: str, env: dict[str, str] | None = None, **values) -> dict:
    for name, value in values.items():
        code = code.replace(name, repr(value))
    out = subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lf-mem-"))
    bank = random_bank(tmp / "vitb")
    [profile] = profiles_for(bank, 1, tmp)
    shards = make_shards(tmp / "shards", 2, 48, 256)
    common = dict(BANK=str(bank.path), SHARDS=shards, PROFILE=str(profile), OUT=str(tmp / "out"))
    results = {"model alone (VmRSS after one batch)": measure(MODEL_ALONE),
               "score, bank read layer by layer (peak)": measure(SCORE, EAGER=False, **common),
               "score, bank read whole (peak)": measure(SCORE, EAGER=True, **common),
               f"score, {FIXED_MMAP} (peak)": measure(SCORE, dict([FIXED_MMAP.split("=")]), EAGER=False, **common),
               "score, " + " ".join(f"{k}={v}" for k, v in HUGE_MMAP.items()) + " (peak)":
                   measure(SCORE, HUGE_MMAP, EAGER=False, **common)}
    alone = results["model alone (VmRSS after one batch)"]
    for label, r in results.items():
        r["peak_over_model_alone_after"] = round(r["peak_mib"] / alone["rss_mib"], 3)
        r["peak_over_model_alone_peak"] = round(r["peak_mib"] / alone["peak_mib"], 3)
        print(f"{label:58s} peak {r['peak_mib']:7.0f} MiB, after {r['rss_mib']:7.0f} MiB; peak / model alone "
              f"after its batch {r['peak_over_model_alone_after']:.2f}, / its peak in the batch "
              f"{r['peak_over_model_alone_peak']:.2f}" + (f"; {r['images_per_second']} img/s" if "images_per_second" in r else ""))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
