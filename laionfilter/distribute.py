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
from typing import Any, Callable

from .errors import LaionfilterError
from .log import progress_bar


class ShardScorer:
    """A Ray actor: merged models built once, then one shard per call, through the local runner's loop."""

    def __init__(self, profiles: list[tuple[str, str]], bank_path: str, device: str, batch_size: int, out: str,
                 fingerprint: str, compile: bool = False, cpu_chunk: int | None = None, max_pixels: int | None = None,
                 after_batch: Callable[[], Any] | None = None, precision: str = "auto", decode: str = "full"):
        from .bank import load_bank
        from .images import MAX_PIXELS, Preprocessor
        from .profile import load_profile
        from .scorer import MergedModels, check_decode, scoring_device

        bank = load_bank(bank_path)
        loaded = [(column, load_profile(p)) for column, p in profiles]
        self.models = MergedModels(loaded, bank, scoring_device(device), compile, cpu_chunk, precision)
        self.decode = check_decode(decode, self.models.device)
        self.pre = Preprocessor(bank.manifest["architecture"]["preprocess"], max_pixels or MAX_PIXELS,
                                scaled_decode=self.decode == "scaled")
        self.batch_size, self.out, self.fingerprint = batch_size, Path(out), fingerprint
        self.after_batch = after_batch  # tests inject a fault here

    def score(self, url: str) -> dict[str, Any]:
        from .mapper import shard_batches
        from .scorer import write_batches

        for stats in write_batches(shard_batches(url, self.pre, self.batch_size, self.decode == "gpu"), self.models, self.out,
                                   self.fingerprint, on_batch=self.after_batch and (lambda _: self.after_batch())):
            return stats
        raise RuntimeError(f"{url}: shard ended without its end marker")

    def pid(self) -> int:
        return os.getpid()


def run_ray(todo: list[str], profiles: list[tuple[str, Path]], bank_path: Path, out: Path, fingerprint: str,
            cfg, summary: dict[str, Any], progress: bool = True, after_batch: Callable[[], Any] | None = None) -> None:
    """Score the shards in ``todo`` on a Ray cluster, counting finished shards into ``summary``.

    ``after_batch`` runs in the actor after each batch (tests use it to kill an actor mid-shard).
    """
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise LaionfilterError("--distributor ray needs Ray: pip install 'laionfilter[ray]'") from None
    from .scorer import add_stats

    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, ignore_reinit_error=True, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and gpus > 0)
    if use_gpu and not gpus:
        raise LaionfilterError("--device cuda: the Ray cluster has no GPU")
    slots = gpus if use_gpu else int(ray.cluster_resources().get("CPU", 1))
    n = max(1, min(len(todo), cfg.ray_actors or slots))
    actor = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1, max_restarts=-1, max_task_retries=3)(ShardScorer)
    actors = [actor.remote([(c, str(p)) for c, p in profiles], str(bank_path), "cuda" if use_gpu else "cpu",
                           cfg.batch_size, str(out), fingerprint, cfg.compile, cfg.cpu_chunk, cfg.max_pixels, after_batch,
                           cfg.precision, cfg.decode)
              for _ in range(n)]
    bar = progress_bar(total=len(todo), desc=f"score on Ray ({n} actors)", unit="shard", disable=not progress)
    images = 0
    for stats in ActorPool(actors).map_unordered(lambda a, url: a.score.remote(url), todo):
        add_stats(summary, stats)
        images += stats["samples"]
        bar.update(1)
        bar.set_postfix(images=images, refresh=False)
    bar.close()
    for a in actors:
        ray.kill(a)
