"""What an image just under the pixel limit costs a decoding worker: the peak resident memory that
decoding and preprocessing one 15,800 × 15,800 PNG (250 Mpx, under the default 256 Mpx limit) adds,
and the same for one over the limit (refused from its header). Each image in a fresh process.

    python benchmarks/big_image.py --json benchmarks/results/big-image.json     # about 30 s
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import re, sys, time
from laionfilter.bank import resolve_bank
from laionfilter.images import ImageDecodeError, Preprocessor
def kib(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1))
pre = Preprocessor(resolve_bank("starter").manifest["architecture"]["preprocess"])
data = open(sys.argv[1], "rb").read()
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
before = kib("VmRSS")
t = time.perf_counter()
try:
    pre(data)
    status = "ok"
except ImageDecodeError as e:
    status = e.kind
seconds = time.perf_counter() - t
added = kib("VmHWM") - before
print(status, added / 1024, seconds)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from PIL import Image

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in (15_800, 16_200):
            path = Path(tmp) / f"{side}.png"
            Image.new("RGB", (side, side), (10, 120, 200)).save(path)
            out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
            status, added, seconds = out.stdout.split()
            rows.append({"side": side, "megapixels": round(side * side / 1e6, 1), "status": status,
                         "peak_added_mib": round(float(added)), "seconds": round(float(seconds), 2)})
            print(rows[-1])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
