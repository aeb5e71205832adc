"""The scores of a fixed input, pinned: a refactor of the scoring path must not change a single value.

Input: the bundled example images in one shard (webdataset's TarWriter), a 16-bit PNG and a broken
sample beside them; the shipped starter bank; two profiles with fixed coefficients (no learning, so no
randomness). The expected table (tests/data/golden-scores.parquet) was written by the scorer before the
scoring path was split into stages. Compared as a table (every column, value and type), not as bytes:
the Parquet writer stamps its own version into the file.

The scores are compared to float32's last bits, not bit for bit: MKL's float32 matrix products round
differently by CPU and thread count. On an AMD EPYC (AVX-512; measured 2026-11-30) the same torch
build gives 7 to 9 of the 14 rows one or two ulps away from this table (at most 9.5e-7, on scores
near 8), and one thread (a DataLoader worker) differs from two (the main process) likewise; on the
machines before it, both paths gave the table bit for bit (this test compared exactly then). A change
to the scoring path moves scores by far more. On one thread the two paths must write the very same
bytes; `benchmarks/same_bytes.py` compares a past commit's part files with today's on one machine.
"""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from laionfilter.bank import resolve_bank
from laionfilter.formats import PROFILE_FORMAT
from laionfilter.devices import torch_threads
from laionfilter.profile import Profile
from laionfilter.score import ScoreConfig, score_shards

from .helpers import write_shard

GOLDEN = Path(__file__).parent / "data" / "golden-scores.parquet"
EXAMPLES = Path(__file__).parent.parent / "laionfilter" / "data" / "example" / "images"


def golden_inputs(root: Path):
    bank = resolve_bank("starter")
    samples = []
    for p in sorted(EXAMPLES.glob("*.jpg"))[:12]:
        samples.append({"__key__": p.stem, "jpg": p.read_bytes(),
                        "json": json.dumps({"url": f"https://example.com/{p.name}", "caption": p.stem}).encode()})
    grey = np.asarray(Image.open(EXAMPLES / "00.jpg").convert("L")).astype(np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, "PNG")
    samples.append({"__key__": "grey16", "png": buf.getvalue()})
    samples.append({"__key__": "broken", "jpg": b"broken"})
    shard = write_shard(root / "golden.tar", samples)
    profiles = []
    n, L = bank.n, len(bank.layers)
    for name, alpha in (("even", torch.full((n, L), 1.0 / n)),
                        ("ramp", torch.linspace(-0.5, 1.5, n)[:, None] * torch.linspace(0.5, 1.0, L)[None, :] / n)):
        meta = {"format": PROFILE_FORMAT, "name": name, "bank": {"fingerprint": bank.fingerprint, "path": str(bank.path)},
                "tasks": [t["name"] for t in bank.tasks], "layers": L}
        profiles.append(Profile(alpha.contiguous(), meta).save(root / f"{name}.profile"))
    return shard, profiles, bank


def score_golden(root: Path, workers: int):
    shard, profiles, bank = golden_inputs(root)
    out = root / f"scores-{workers}"
    # float32, as the table was written (bf16, the default on a CPU with bf16 units, is compared with it
    # in test_score and benchmarks/decode.py)
    cfg = ScoreConfig(workers=workers, batch_size=5, device="cpu", precision="fp32")
    score_shards(str(shard), profiles, out, bank=bank, cfg=cfg, progress=False)
    return out / "golden.parquet"


def test_scores_of_a_fixed_input_are_unchanged(tmp_path):
    want = pq.read_table(GOLDEN)
    scores = [f.name for f in want.schema if pa.types.is_floating(f.type)]
    assert scores == ["even", "ramp"]
    # scored in the main process, and in a worker as the CPU path does; both on one thread, as a worker runs
    with torch_threads(1):
        parts = [score_golden(tmp_path, workers) for workers in (0, 1)]
    assert parts[0].read_bytes() == parts[1].read_bytes()
    for workers, part in enumerate(parts):
        got = pq.read_table(part)
        assert got.schema.equals(want.schema), workers
        assert got.drop_columns(scores).equals(want.drop_columns(scores)), workers
        for name in scores:
            a, b = want[name].to_numpy(zero_copy_only=False), got[name].to_numpy(zero_copy_only=False)
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{name}, workers={workers}")
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=0, err_msg=f"{name}, workers={workers}")
