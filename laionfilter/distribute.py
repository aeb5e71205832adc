"""Scoring beyond one machine with Ray: one task per shard on a pool of actors, Ray's retries included.

Each actor loads the bank and the profiles once (from paths every node can read: a shared filesystem,
or the same files copied to each node) and materialises the merged models once; then it scores whole
shards with the very code of the local runner and writes the same part files and ``_stats.json``. A
task whose actor dies is retried on a restarted actor; a part file is only renamed into place when
whole, so a shard cut short leaves nothing behind but its retry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import LaionfilterError


class ShardScorer:
    """A Ray actor: merged models built once, then one shard per call."""

    def __init__(self, profiles: list[tuple[str, str]], bank_path: str, device: str, batch_size: int, out: str,
                 fingerprint: str, compile: bool = False, fault_file: str | None = None, cpu_chunk: int | None = None,
                 max_pixels: int | None = None):
        import torch

        from .bank import load_bank
        from .images import MAX_PIXELS, Preprocessor
        from .model import pick_device
        from .profile import load_profile
        from .score import MergedModels

        bank = load_bank(bank_path)
        loaded = [(column, load_profile(p)) for column, p in profiles]
        dev = pick_device(device)
        if dev.type == "cuda" and torch.cuda.device_count():
            dev = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        self.models = MergedModels(loaded, bank, dev, compile, cpu_chunk)
        self.pre = Preprocessor(bank.manifest["architecture"]["preprocess"], max_pixels or MAX_PIXELS)
        self.batch_size, self.out, self.fingerprint, self.fault_file = batch_size, Path(out), fingerprint, fault_file

    def score(self, url: str) -> dict[str, Any]:
        from .reader import shard_name
        from .score import shard_batches
        from .writer import ShardRows

        rows = ShardRows(url, shard_name(url), self.models.names)
        for batch in shard_batches(url, self.pre, self.batch_size):
            if batch["end"]:
                return rows.finish(self.out, self.fingerprint, batch["error"])
            rows.add(self.models.rows(batch))
            if self.fault_file and os.path.exists(self.fault_file):
                os.remove(self.fault_file)  # fault injection for tests: die once, mid-shard
                os._exit(1)
        raise RuntimeError(f"{url}: shard ended without its end marker")

    def pid(self) -> int:
        return os.getpid()


def score_with_ray(todo: list[str], profiles: list[tuple[str, Path]], bank_path: Path, out: Path, fingerprint: str,
                   cfg, summary: dict[str, Any], progress: bool = True) -> None:
    """Score the shards in ``todo`` on a Ray cluster, counting finished shards into ``summary``."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise LaionfilterError("--distributor ray needs Ray: pip install 'laionfilter[ray]'") from None
    from .score import add_stats

    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, ignore_reinit_error=True, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and gpus > 0)
    if use_gpu and not gpus:
        raise LaionfilterError("--device cuda: the Ray cluster has no GPU")
    slots = gpus if use_gpu else int(ray.cluster_resources().get("CPU", 1))
    n = max(1, min(len(todo), cfg.ray_actors or slots))
    actor = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1, max_restarts=-1, max_task_retries=3)(ShardScorer)
    fault = os.environ.get("LAIONFILTER_FAULT_ONCE")
    actors = [actor.remote([(c, str(p)) for c, p in profiles], str(bank_path), "cuda" if use_gpu else "cpu",
                           cfg.batch_size, str(out), fingerprint, cfg.compile, fault, cfg.cpu_chunk, cfg.max_pixels)
              for _ in range(n)]
    bar = tqdm(total=len(todo), desc=f"score on Ray ({n} actors)", unit="shard", disable=not progress)
    images = 0
    for stats in ActorPool(actors).map_unordered(lambda a, url: a.score.remote(url), todo):
        add_stats(summary, stats)
        images += stats["samples"]
        bar.update(1)
        bar.set_postfix(images=images)
    bar.close()
    for a in actors:
        ray.kill(a)
