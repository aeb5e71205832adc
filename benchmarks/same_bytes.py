"""Does a change to the scoring path move a single byte? The golden input's part files, before and after.

Scores the fixed input of `tests/test_golden.py` (the starter bank, two fixed profiles, 14 samples)
with the code of a past commit and with the working tree, each in a fresh process on this machine,
on 1 and 2 torch threads, in the main process (workers 0) and in a DataLoader worker (workers 1), and
compares the part files byte for byte. The test's stored table was written on another CPU, and MKL's
float32 products round differently from CPU to CPU and by thread count, so the test allows float32's
last bits; run on one machine, this shows whether a refactor changed anything at all.

    python benchmarks/same_bytes.py --before 616cd6d    # the commit that pinned the golden scores

Any commit from 616cd6d on works (it needs `tests/test_golden.py`). Exits 1 when a file differs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCORE = """
import sys, tempfile
from pathlib import Path
import torch
threads, out = int(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(threads)
import laionfilter
from tests.test_golden import score_golden
assert Path(laionfilter.__file__).is_relative_to(Path.cwd()), laionfilter.__file__  # this tree's code
root = Path(tempfile.mkdtemp())
for workers in (0, 1):
    score_golden(root, workers)  # returns a table in early commits, the path later: read where both write
    (out / f"threads{threads}-workers{workers}.parquet").write_bytes((root / f"scores-{workers}" / "golden.parquet").read_bytes())
"""


def score(tree: Path, out: Path) -> dict[str, str]:
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    for threads in (1, 2):
        subprocess.run([sys.executable, "-c", SCORE, str(threads), str(out)], cwd=tree, env=env, check=True)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.parquet"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="a commit (616cd6d or later)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lf-bytes-"))
    before = tmp / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(before), args.before], check=True)
    try:
        if not (before / "tests" / "test_golden.py").exists():
            sys.exit(f"{args.before} has no tests/test_golden.py: use 616cd6d or a later commit")
        old, new = score(before, tmp / "old"), score(ROOT, tmp / "new")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=True)
    for name in old:
        print(f"{name:28s} {args.before}: {old[name][:12]}  working tree: {new[name][:12]}  "
              f"{'same bytes' if old[name] == new[name] else 'DIFFERENT'}")
    sys.exit(0 if old == new else 1)


if __name__ == "__main__":
    main()
