"""Stage 3 of scoring: the merged models on a device, and the one loop that turns batches into part files.

``MergedModels`` holds every profile's merged model and returns scores only. ``write_batches`` is the
one loop every runner shares (the local DataLoader, each torchrun rank, each Ray actor): batches in,
rows handed to the writer, one stats record out per finished shard. ``run_local`` feeds it from a
DataLoader whose workers read and decode (``mapper``) and, on the CPU, also score.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.func import functional_call
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .bank import Bank
from .errors import LaionfilterError
from .images import MAX_PIXELS, Preprocessor
from .log import note, progress_bar
from .mapper import Batch, ShardDone, decode_on_device, shard_batches
from .merge import merge_weights
from .devices import pick_device, resolve_precision, usable_cores
from .model import ScoreHead, ScoreModel, count_blocks, layer_stage
from .profile import Profile
from .reader import shard_name
from .writer import ShardRows, rating_columns


def scoring_device(name: str = "auto") -> torch.device:
    """The device to score on; an unnumbered CUDA device is torchrun's ``LOCAL_RANK`` (else 0: under Ray,
    CUDA_VISIBLE_DEVICES leaves each actor one GPU)."""
    device = pick_device(name)
    if device.type == "cuda" and device.index is None:
        device = pick_device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return device


# ``full`` (the default): every image decoded at full size by the workers on the CPU. The others are
# options, each measured (benchmarks/README.md): ``scaled`` (a large JPEG decoded at a reduced DCT scale)
# moved the starter bank's ranking too far, since its tasks judge sharpness and noise at 64 pixels;
# ``gpu`` (nvJPEG in the main process) was slower than the workers on 256-pixel JPEGs on an H200 with 16
# cores, and faster only on 1,024-pixel ones.
DECODES = ("full", "scaled", "gpu")


def check_decode(decode: str, device: torch.device) -> str:
    if decode not in DECODES:
        raise LaionfilterError(f"decode must be one of {', '.join(DECODES)}, not {decode!r}")
    if decode == "gpu" and device.type != "cuda":
        raise LaionfilterError(f"--decode gpu needs a CUDA device, not {device}")
    return decode


def default_workers() -> int:
    """One worker per core this process may use, shared with the other processes of a torchrun launch."""
    return max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


class _Heads:
    """K score heads on one trunk's features, computed together.

    Each profile's first head layer is W_pre + Σ_i α_i τ_i, so its output for any profile is the same
    linear combination of the n + 1 outputs h·W_preᵀ, h·τ_iᵀ: those are computed once per batch,
    whatever K. Only the combination, the GELU and the small second layer are paid per profile.
    """

    def __init__(self, bank: Bank, alphas: list[torch.Tensor], model: ScoreModel, device: torch.device):
        idx = {l: i for i, l in enumerate(bank.layers)}
        first, rest = ScoreHead.FIRST_WEIGHT, ScoreHead.REST
        a0 = torch.stack([a[:, idx[first]] for a in alphas])  # [K, n]
        self.coef = torch.cat([torch.ones(len(alphas), 1), a0], 1).to(device)  # [K, n + 1]
        self.basis = torch.cat([bank.pre[first][None], bank.tau[first].float()]).to(device)  # [n + 1, hidden, E]
        merged = [merge_weights(bank.pre, bank.tau, list(rest), a[:, [idx[l] for l in rest]]) for a in alphas]
        self.b0, self.w3, self.b3 = (torch.stack([m[l] for m in merged]).to(device) for l in rest)
        self.model = model

    # Profiles at a time. On the CPU 8, so that their [8, N, hidden] activations stay in cache (tiny ViT,
    # K = 512: 2.7 → 1.0 ms/image); on a GPU as many as fit in GPU_BLOCK_BYTES, since there each block
    # costs kernel launches (tiny ViT on an H200, K = 512 in blocks of 8: 14× the time of K = 1).
    BLOCK = 8
    GPU_BLOCK_BYTES = 256 * 2**20

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """Features [N, E] → scores [K, N], in float32 (see ``ScoreModel.head_score``)."""
        with torch.autocast(h.device.type, enabled=False):
            return self._scores(h.float())

    def _scores(self, h: torch.Tensor) -> torch.Tensor:
        n_img, hidden = len(h), self.b0.shape[1]
        block = self.BLOCK if h.device.type == "cpu" else max(1, self.GPU_BLOCK_BYTES // (4 * n_img * hidden))
        basis = torch.einsum("ne,bhe->bnh", h, self.basis).reshape(len(self.basis), -1)  # [n + 1, N·hidden]
        out = []
        for i in range(0, len(self.coef), block):
            j = slice(i, i + block)
            products = (self.coef[j] @ basis).view(-1, n_img, hidden)
            out.append(self.model.score(ScoreHead.after_first_product(products, self.b0[j], self.w3[j], self.b3[j])))
        return torch.cat(out)


class _Tail(torch.nn.Module):
    """A model's stages from ``split`` on, run with one profile's weights through functional_call."""

    def __init__(self, model: ScoreModel):
        super().__init__()
        self.m = model

    def forward(self, h: torch.Tensor, split: int) -> torch.Tensor:
        return self.m.tail(h, split)


def group_by_prefix(alphas: list[torch.Tensor], stages: torch.Tensor, n_blocks: int) -> list[tuple[int, list[int]]]:
    """(split, profiles) groups: profiles whose coefficients agree on every stage below ``split`` share
    that trunk; the deepest split is taken first. A profile that shares nothing is a group of one at
    split 0 (its whole merged model)."""
    left = list(range(len(alphas)))
    groups = []
    for split in range(n_blocks + 2, 0, -1):
        below = stages < split
        buckets: dict[bytes, list[int]] = {}
        for i in left:
            buckets.setdefault(alphas[i][:, below].contiguous().numpy().tobytes(), []).append(i)
        taken = set()
        for members in buckets.values():
            if len(members) > 1:
                groups.append((split, members))
                taken.update(members)
        left = [i for i in left if i not in taken]
    return groups + [(0, [i]) for i in left]


# A CPU forward holds at most about this much in its largest activation (the MLP's hidden layer or the
# attention matrices), in images per forward: the tiny ViT's batches of 256 spill the caches (1.8k img/s
# in forwards of 32, 1.1k in one of 256), and ViT-B-16 runs faster in forwards of 8 than of 32 (295
# against 367 ms per image on one thread) while peaking about 250 MiB lower (docs/research-log.md, "Fixed costs").
CPU_FORWARD_BYTES = 20 * 2**20
MAX_CPU_CHUNK = 32


def cpu_chunk_for(architecture) -> int:
    """Images per CPU forward for a ViT of this architecture (``MAX_CPU_CHUNK`` for other towers)."""
    v = architecture.model_config.get("vision_cfg", {})
    if not all(k in v for k in ("image_size", "patch_size", "width")):
        return MAX_CPU_CHUNK
    size = v["image_size"] if isinstance(v["image_size"], (list, tuple)) else (v["image_size"],) * 2
    tokens = (size[0] // v["patch_size"]) * (size[1] // v["patch_size"]) + 1
    hidden = int(v["width"] * v.get("mlp_ratio", 4.0))
    heads = v["width"] // v.get("head_width", 64)
    per_image = 4 * tokens * max(hidden, heads * tokens)  # float32 bytes of the larger of the two
    return max(1, min(MAX_CPU_CHUNK, CPU_FORWARD_BYTES // per_image))


class MergedModels:
    """Every profile's merged model on one device, in inference mode; profiles that share their first
    stages (learned with ``--tune top-N`` or ``head``) share one trunk, run once per batch."""

    def __init__(self, profiles: list[tuple[str, Profile]], bank: Bank, device: torch.device, compile: bool = False,
                 cpu_chunk: int | None = None, precision: str = "auto"):
        self.device = device
        # The towers' weights in this dtype (bf16: held so, not autocast, which re-casts every weight on
        # every forward and ran ViT-B-16 slower than float32 on this CPU); inputs are normalised into it.
        self.dtype = resolve_precision(precision, device)
        self.pre = Preprocessor(bank.manifest["architecture"]["preprocess"])  # normalises; crops JPEGs decoded here
        # images per forward on the CPU (None: cpu_chunk_for the bank); elsewhere the whole batch
        self.chunk = (cpu_chunk or cpu_chunk_for(bank.architecture)) if device.type == "cpu" else None
        self.names = [name for name, _ in profiles]
        # A calibrated profile adds its rating column, computed from its score column:
        # {rating column: (score column, its calibration)}
        calibrations = {name: prof.calibration for name, prof in profiles}
        self.ratings = {rating: (name, calibrations[name]) for rating, name in rating_columns(profiles).items()}
        self.columns = self.names + list(self.ratings)
        alphas = [prof.alpha for _, prof in profiles]
        for _, prof in profiles:
            prof.check_bank(bank)
        skeleton = bank.new_model(empty=True)  # only asked whether it splits
        blocks = count_blocks(bank.layers)
        if skeleton.splittable():
            stages = torch.tensor([layer_stage(l, blocks) for l in bank.layers])
            found = group_by_prefix(alphas, stages, blocks)
        else:
            stages, found = None, [(0, [i]) for i in range(len(profiles))]
        self.groups = []  # (split, member indices, trunk module, heads or tail states)
        for split, members in found:
            model = bank.model(bank.merged_state(alphas[members[0]])).to(device).eval()
            model.visual.to(self.dtype)  # the head stays float32 (ScoreModel.head_score)
            if split == 0:
                part = torch.compile(model) if compile else model
            elif split == blocks + 2:
                part = _Heads(bank, [alphas[i] for i in members], model, device)
            else:
                tail_layers = [l for l, st in zip(bank.layers, stages.tolist()) if st >= split]
                cols = [bank.layers.index(l) for l in tail_layers]
                part = [{f"m.{k}": v.to(device, self.dtype if k.startswith("visual.") else v.dtype) for k, v in
                         merge_weights(bank.pre, bank.tau, tail_layers, alphas[i][:, cols]).items()} for i in members]
            self.groups.append((split, members, model, part))
        del skeleton

    @torch.inference_mode()
    def _group_scores(self, split: int, model: ScoreModel, part, x: torch.Tensor) -> torch.Tensor:
        """The group's scores of ``x``, [members, N]."""
        if split == 0:
            return part(x).float()[None]
        h = model.trunk(x, split)
        if isinstance(part, _Heads):
            return part(h)
        tail = _Tail(model)
        return torch.stack([functional_call(tail, state, (h, split)).float() for state in part])

    @torch.inference_mode()
    def scores(self, batch: Batch) -> dict[str, np.ndarray]:
        """One float32 array per column: the scores of the batch's rows that have pixels (``batch.index``),
        in that order; empty when none has."""
        if batch.pixels is None:
            out = {name: np.empty(0, np.float32) for name in self.names}
        else:
            # uint8 crosses to the device (a quarter of float32's bytes) and is normalised there
            x = self.pre.normalise(batch.pixels.to(self.device, non_blocking=True), self.dtype)
            step = self.chunk or len(x)
            out = {}
            for split, members, model, part in self.groups:
                y = torch.cat([self._group_scores(split, model, part, x[j:j + step]) for j in range(0, len(x), step)], 1)
                # one copy from the device per group, and no Python float per score: on a GPU with 512
                # head profiles of the tiny ViT, per-profile copies and then Python floats were most of the time
                y = y.cpu().numpy()
                out.update((self.names[i], y[k]) for k, i in enumerate(members))
        for rating, (name, cal) in self.ratings.items():
            out[rating] = np.asarray(cal(out[name]), dtype=np.float32)
        return out


def write_batches(batches: Iterable[Batch | ShardDone], models: MergedModels, out, fingerprint: str,
                  on_batch: Callable[[Batch], Any] | None = None) -> Iterator[dict[str, Any]]:
    """Batches (of any shards, interleaved) → rows in the writer; yields each shard's stats when it ends.

    A batch not yet scored (``scores`` None) is scored here. ``on_batch`` is called after each batch
    (progress; tests inject faults through it).
    """
    open_shards: dict[str, ShardRows] = {}
    for item in batches:
        rows = open_shards.get(item.url) or open_shards.setdefault(
            item.url, ShardRows(item.url, shard_name(item.url), models.columns))
        if isinstance(item, ShardDone):
            del open_shards[item.url]
            yield rows.finish(out, fingerprint, item.error)
            continue
        if item.jpegs:
            item = decode_on_device(item, models.pre, models.device)
        rows.add(item.rows, item.index, item.scores if item.scores is not None else models.scores(item))
        if on_batch:
            on_batch(item)


class ShardBatches(IterableDataset):
    """This DataLoader worker's shards (every num_workers-th), batch by batch.

    With ``models`` (CPU scoring), each batch is scored in the worker and handed back with its scores
    and without pixels.
    """

    def __init__(self, urls: list[str], preprocess: dict[str, Any], batch_size: int,
                 models: MergedModels | None = None, max_pixels: int = MAX_PIXELS, decode: str = "full"):
        self.urls, self.preprocess, self.batch_size, self.models = urls, preprocess, batch_size, models
        self.max_pixels, self.decode = max_pixels, decode

    def __iter__(self) -> Iterator[Batch | ShardDone]:
        info = get_worker_info()
        mine = self.urls[info.id::info.num_workers] if info else self.urls
        if info:
            torch.set_num_threads(1)  # one thread per worker process: the cores are shared
        pre = Preprocessor(self.preprocess, self.max_pixels, scaled_decode=self.decode == "scaled")
        for url in mine:
            for item in shard_batches(url, pre, self.batch_size, gpu_jpeg=self.decode == "gpu"):
                if self.models is not None and isinstance(item, Batch):
                    item.scores, item.pixels = self.models.scores(item), None
                yield item


def _identity(x):
    return x


def run_local(todo: list[str], models: MergedModels, bank: Bank, out, fingerprint: str, cfg,
              summary: dict[str, Any], progress: bool = True) -> None:
    """Score ``todo`` in this process: DataLoader workers read and decode (and on the CPU score)."""
    device = models.device
    workers = min(default_workers() if cfg.workers is None else cfg.workers, len(todo))
    in_workers = models if device.type == "cpu" and workers else None  # forked workers share the weights
    dataset = ShardBatches(todo, bank.manifest["architecture"]["preprocess"], cfg.batch_size, in_workers, cfg.max_pixels,
                           check_decode(cfg.decode, device))
    loader = DataLoader(dataset, batch_size=None, collate_fn=_identity, num_workers=workers,
                        pin_memory=device.type == "cuda", prefetch_factor=cfg.prefetch if workers else None,
                        persistent_workers=False)
    bar = progress_bar(desc=f"score {len(todo)} shard(s)", unit="img", disable=not progress, smoothing=0.1)
    started, first = time.time(), []

    def on_batch(b: Batch) -> None:
        if not first:
            first.append(time.time())  # workers started, first batch decoded (and on the CPU scored)
        bar.update(len(b.rows))

    for stats in write_batches(loader, models, out, fingerprint, on_batch=on_batch):
        add_stats(summary, stats)
    bar.close()
    end = time.time()
    summary.setdefault("timing", {}).update(first_batch_s=round((first[0] if first else end) - started, 3),
                                            stream_s=round(end - (first[0] if first else end), 3))


def add_stats(summary: dict[str, Any], stats: dict[str, Any]) -> None:
    """Count one finished shard into the run's summary."""
    summary["samples"] += stats["samples"]
    summary["scored"] += stats["ok"]
    summary["failed_samples"] += stats["samples"] - stats["ok"]
    if stats["status"] == "failed":
        summary["failed"] += 1
        summary["failed_shards"].append({"shard": stats["shard"], "error": stats["error"]})
        note(f"{stats['shard']}: shard broke after {stats['samples']} samples ({stats['error']}); "
             "its rows are kept and the next run redoes it")
    else:
        summary["done"] += 1
