"""Decoding and preprocessing per DataLoader worker, in images per second, and what it does to the scores.

Per worker (one DataLoader worker process on one thread, batches of 64 handed back to the main process
through shared memory, as `score` runs them), on JPEGs whose shorter side is 256, 512 and 1,024 pixels,
and on 512-pixel PNG and WebP, for ViT-B-16's preprocessing (resize to 224, crop 224) and the starter
bank's (64):
  float32    full-size decode, resize, crop, float32 normalised in the worker (the path before uint8);
  uint8      the same pixels handed over as uint8 and normalised where the model runs (the default);
  scaled     uint8, and a JPEG at least twice the resize target decoded at a reduced DCT scale
             (``score --decode scaled``).
Then the decoders alone on the 1,024-pixel JPEGs (torchvision at full size, PIL at the reduced scale);
on the starter bank, `score`'s whole streaming loop (the default: full-size decoding, bf16 where
the CPU has it) with one worker on one core against a plain loop on one core that decodes each image at
full size and resizes it (no model), side by side; and the scores' agreement of ``scaled`` with full-size
decoding (Spearman, and the largest difference over the scores' range) for the starter bank and for
ViT-B-16 (random weights), on the 256- and 1,024-pixel JPEGs. The variants alternate, repeated
``--repeats`` times (the median is reported).

    python benchmarks/decode.py --json benchmarks/results/decode-epyc.json     # about 6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from score import make_shards, profiles_for, random_bank  # noqa: E402

from laionfilter.bank import resolve_bank  # noqa: E402
from laionfilter.images import Preprocessor  # noqa: E402
from laionfilter.mapper import Batch, shard_batches  # noqa: E402
from laionfilter.metrics import srocc  # noqa: E402
from laionfilter.profile import load_profile  # noqa: E402
from laionfilter.reader import Sample, read_shard  # noqa: E402
from laionfilter.score import ScoreConfig, score_shards  # noqa: E402

VIT_B = {"size": 224, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
         "interpolation": "bicubic", "resize_mode": "shortest"}
BATCH = 64


class Variant(torch.utils.data.IterableDataset):
    """One worker's batches under one decoding variant; yields what a worker would hand back."""

    def __init__(self, urls: list[str], preprocess: dict, variant: str):
        self.urls, self.preprocess, self.variant = urls, preprocess, variant

    def __iter__(self):
        torch.set_num_threads(1)
        pre = Preprocessor(self.preprocess, scaled_decode=self.variant == "scaled")
        for url in self.urls:
            for b in shard_batches(url, pre, BATCH):
                if isinstance(b, Batch):
                    yield pre.normalise(b.pixels) if self.variant == "float32" else b.pixels


def per_worker(urls: list[str], preprocess: dict, variant: str) -> float:
    loader = torch.utils.data.DataLoader(Variant(urls, preprocess, variant), batch_size=None, num_workers=1,
                                         prefetch_factor=2, collate_fn=lambda x: x)
    t = time.perf_counter()
    n = sum(len(b) for b in loader)
    return n / (time.perf_counter() - t)


def encoded(urls: list[str], fmt: str) -> list[str]:
    """The shards' JPEGs re-encoded as PNG or WebP, in new shards beside them."""
    import webdataset as wds

    out = []
    for url in urls:
        path = Path(url).with_name(Path(url).stem + f"-{fmt}.tar")
        with wds.TarWriter(str(path)) as sink:
            for s in read_shard(url):
                if isinstance(s, Sample):
                    buf = io.BytesIO()
                    Image.open(io.BytesIO(s.files["jpg"])).save(buf, fmt.upper(), **({"quality": 90} if fmt == "webp" else {}))
                    sink.write({"__key__": s.key, fmt: buf.getvalue()})
        out.append(str(path))
    return out


def plain_loop(urls: list[str], side: int) -> float:
    """Full-size decode (PIL) and a resize of the shorter side to ``side``, one image after another."""
    t, n = time.perf_counter(), 0
    for url in urls:
        for s in read_shard(url):
            if isinstance(s, Sample):
                img = Image.open(io.BytesIO(s.files["jpg"])).convert("RGB")
                k = side / min(img.size)
                img.resize((round(img.width * k), round(img.height * k)), Image.BICUBIC)
                n += 1
    return n / (time.perf_counter() - t)


def stream_rate(urls: list[str], bank, prof: Path, out: Path) -> float:
    s = score_shards(urls, [prof], out, bank=bank, cfg=ScoreConfig(batch_size=BATCH, workers=1, device="cpu",
                                                                     overwrite=True), progress=False)
    return s["samples"] / s["timing"]["stream_s"]


def agreement(urls: list[str], bank, prof: Path) -> dict:
    model = load_profile(prof).model(bank).eval()
    preprocess = bank.manifest["architecture"]["preprocess"]
    got = {}
    for variant in ("full", "scaled"):
        pre = Preprocessor(preprocess, scaled_decode=variant == "scaled")
        x = pre.normalise(torch.cat([b.pixels for u in urls for b in shard_batches(u, pre, BATCH) if isinstance(b, Batch)]))
        with torch.inference_mode():
            got[variant] = torch.cat([model(x[i:i + 16]) for i in range(0, len(x), 16)]).numpy()
    a, b = got["full"], got["scaled"]
    return {"images": len(a), "spearman": round(srocc(a, b), 5),
            "max_abs_diff_over_range": round(float(np.abs(a - b).max() / np.ptp(a)), 5)}


def decoder_only(urls: list[str], target: int) -> dict[str, float]:
    """Milliseconds per image of the decoders alone, in this process on one thread: torchvision's full-size
    decode against PIL's at the reduced DCT scale (what bounds scaled decoding: libjpeg still reads every
    coefficient of the entropy-coded data, whatever the scale)."""
    from laionfilter.images import _decode_whole, _header, _load

    data = [s.files["jpg"] for u in urls for s in read_shard(u) if isinstance(s, Sample)]
    out = {}
    for name, f in (("full_ms", lambda d: _decode_whole(d, _header(d, 1 << 40))),
                    ("dct_scaled_ms", lambda d: _load(_header(d, 1 << 40), target))):
        f(data[0])
        t = time.perf_counter()
        for d in data:
            f(d)
        out[name] = round((time.perf_counter() - t) / len(data) * 1000, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--images", type=int, default=256, help="images per shard set")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="lf-decode-"))
    starter = resolve_bank("starter")
    sets = {f"jpeg-{side}": make_shards(tmp / f"j{side}", 2, args.images // 2, side, seed=side) for side in (256, 512, 1024)}
    sets["png-512"] = encoded(sets["jpeg-512"], "png")
    sets["webp-512"] = encoded(sets["jpeg-512"], "webp")
    res: dict = {"torch": torch.__version__, "images": args.images, "batch": BATCH, "per_worker": {}}
    for model, preprocess in (("vit-b-16", VIT_B), ("starter", starter.manifest["architecture"]["preprocess"])):
        for name, urls in sets.items():
            runs = {v: [] for v in ("float32", "uint8", "scaled")}
            for _ in range(args.repeats):
                for v in runs:
                    runs[v].append(per_worker(urls, preprocess, v))
            row = {v: round(float(np.median(r)), 1) for v, r in runs.items()}
            row["uint8_over_float32"] = round(row["uint8"] / row["float32"], 2)
            row["scaled_over_float32"] = round(row["scaled"] / row["float32"], 2)
            res["per_worker"].setdefault(model, {})[name] = row
            print(model, name, row, flush=True)
    res["decoder_only_jpeg_1024_to_224"] = decoder_only(sets["jpeg-1024"], 224)
    print("decoders alone, 1,024-pixel JPEGs", res["decoder_only_jpeg_1024_to_224"], flush=True)
    [prof] = profiles_for(starter, 1, tmp / "p")
    loops = {}
    for side in (256, 1024):
        urls = sets[f"jpeg-{side}"]
        runs = {"score_stream": [], "plain_loop": []}
        for _ in range(args.repeats):
            runs["score_stream"].append(stream_rate(urls, starter, prof, tmp / "s"))
            runs["plain_loop"].append(plain_loop(urls, 64))
        row = {k: round(float(np.median(v)), 1) for k, v in runs.items()}
        row["ratio"] = round(row["score_stream"] / row["plain_loop"], 2)
        loops[f"jpeg-{side}"] = row
        print("starter, one core", side, row, flush=True)
    res["starter_stream_vs_plain_loop"] = loops
    vitb = random_bank(tmp / "vitb", "ViT-B-16")
    [vprof] = profiles_for(vitb, 1, tmp / "vp")
    res["scaled_agreement"] = {f"{name}, jpeg-{side}": agreement(sets[f"jpeg-{side}"], bank, p)
                               for name, bank, p in (("starter", starter, prof), ("vit-b-16", vitb, vprof))
                               for side in (256, 1024)}
    print(res["scaled_agreement"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
