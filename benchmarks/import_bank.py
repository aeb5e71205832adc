"""Peak memory of `laionfilter bank import` on six synthetic ViT-B-16 checkpoints in the authors' layout.

Each file is torch.save({'model': sd}) with sd = backbone.* (a whole OpenCLIP ViT-B-16 CLIP, text tower
included, random weights, the vision tower moved a little) + score_predictor.projection.{0,3}.* (a 3fc
head), as the authors' clip_B_3fc_*.pth are. The import runs in a fresh process; its peak RSS
(ru_maxrss) is compared with the size of one checkpoint and of the bank it writes.

    python benchmarks/import_bank.py --workdir /tmp/import-bench     # about 5 minutes on 2 cores, 5 GB of disk
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMPORT = r"""
import sys, time, resource
from laionfilter.authors import import_bank
t = time.time()
bank = import_bank(sys.argv[3:], sys.argv[1], sys.argv[2], dtype="float16")
print(round(time.time() - t, 1), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

BASELINE = r"""
import resource, sys
from laionfilter.model import load_base_clip
load_base_clip(sys.argv[1])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_files(work: Path, n: int, arch: str = "ViT-B-16") -> tuple[str, list[Path]]:
    """``n`` checkpoints of ``arch`` in the authors' layout (clip_B_3fc_*.pth, clip_L_3fc_*.pth), and the base."""
    import open_clip
    import torch
    from torch import nn

    from laionfilter.safefiles import write_safetensors

    torch.manual_seed(0)
    clip = open_clip.create_model(arch).eval()
    embed = clip.visual.output_dim
    letter = "L" if "-L-" in arch else "B"
    base = work / "open_clip_model.safetensors"
    if not base.exists():
        write_safetensors(base, clip.state_dict(), {})
    files = []
    for i, name in enumerate(["ava", "aes", "tad", "para", "koniq", "spaq"][:n]):
        path = work / f"clip_{letter}_3fc_{name}.pth"
        files.append(path)
        if path.exists():
            continue
        sd = {}
        for k, v in clip.state_dict().items():
            sd[f"backbone.{k}"] = v + 1e-3 * torch.randn_like(v) if k.startswith("visual.") else v
        torch.manual_seed(100 + i)
        head = nn.Sequential(nn.Linear(embed, 512), nn.GELU(), nn.Dropout(0.5), nn.Linear(512, 10), nn.Sigmoid())
        sd.update({f"score_predictor.projection.{k}": v for k, v in head.state_dict().items()})
        torch.save({"model": sd}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)  # a killed run leaves no half file that a rerun would take
        del sd
    return f"{arch}:{base}", files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/import-bench")
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t = time.time()
    base, files = make_files(work, args.tasks)
    print(f"made {len(files)} checkpoints in {time.time() - t:.0f} s", flush=True)
    out = work / "bank"
    r = subprocess.run([sys.executable, "-c", IMPORT, base, str(out), *map(str, files)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    seconds, peak_kib = r.stdout.split()
    b = subprocess.run([sys.executable, "-c", BASELINE, base], capture_output=True, text=True, check=True)
    result = {
        "tasks": len(files),
        "checkpoint_mib": round(files[0].stat().st_size / 2**20, 1),
        "checkpoints_total_mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
        "bank_mib": round((out / "weights.safetensors").stat().st_size / 2**20, 1),
        "import_seconds": float(seconds),
        "import_peak_rss_mib": round(int(peak_kib) / 1024, 1),
        "base_alone_peak_rss_mib": round(int(b.stdout.strip()) / 1024, 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
