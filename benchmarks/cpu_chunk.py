"""How many images per forward on the CPU: time per image of the merged model at 8, 16 and 32 images
per forward, for the starter bank's tiny ViT and ViT-B-16 (random weights), one thread, alternated,
medians. ``scorer.cpu_chunk_for`` picks the count from the architecture (32 for the tiny ViT, 8 for
ViT-B-16); ``benchmarks/memory.py`` measures what it saves in peak memory.

    python benchmarks/cpu_chunk.py --json benchmarks/results/cpu-chunk.json    # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from profiles import per_image, synthetic_profiles  # noqa: E402
from score import random_bank  # noqa: E402

from laionfilter.bank import resolve_bank  # noqa: E402
from laionfilter.scorer import MergedModels, cpu_chunk_for  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the three sizes")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    setups = [("tiny", resolve_bank("starter"), torch.randn(256, 3, 64, 64)),
              ("ViT-B-16", random_bank(Path(tempfile.mkdtemp(prefix="lf-chunk-"))), torch.randn(32, 3, 224, 224))]
    results = {}
    for label, bank, pixels in setups:
        times: dict[int, list[float]] = {32: [], 16: [], 8: []}
        for _ in range(args.rounds):
            for chunk in times:
                models = MergedModels(synthetic_profiles(bank, 1, "all"), bank, cpu, cpu_chunk=chunk)
                times[chunk].append(per_image(models, pixels, 3))
        results[label] = {"chosen": cpu_chunk_for(bank.architecture),
                          "ms_per_image": {c: round(1000 * statistics.median(v), 3) for c, v in times.items()},
                          "runs_ms": {c: [round(1000 * x, 3) for x in v] for c, v in times.items()}}
        print(label, "chosen", results[label]["chosen"], results[label]["ms_per_image"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
