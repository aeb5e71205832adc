"""Phase 1: fine-tune the score model on one database, once; its difference from θ_pre is a task vector.

Two stages as in appendix F: the head alone with the backbone frozen, then everything; AdamW with a
cosine schedule in each. Checkpoints go to ``OUT.ckpt/`` (safetensors + JSON) and a rerun with the same
configuration resumes from the last one.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from .. import __version__
from .databases import ScoreRange, open_database
from ..errors import LaionfilterError
from ..formats import TASK_FORMAT
from ..objective import cosine_lr
from ..log import note, progress_bar
from ..metrics import plcc, srocc
from ..devices import autocast, pick_device
from ..model import SCALES, HeadConfig, eval_transform, layer_names, load_base, model_state
from ..safefiles import read_json, read_toml, read_safetensors, state_fingerprint, write_json, write_safetensors



@dataclass(frozen=True)
class StageConfig:
    steps: int
    batch_size: int
    lr_start: float
    lr_end: float
    weight_decay: float = 0.05


@dataclass(frozen=True)
class FinetuneConfig:
    database: str  # table file or shards
    base: str  # ARCH, ARCH:PRETRAINED or ARCH:PATH.safetensors
    name: str = ""  # task name; defaults to the database's file name
    scale: str = "1-10"  # score template: "1-10" or "1-5" (0.5..5 in steps of 0.5)
    score_range: tuple[float, float] | None = None  # raw scores mapped linearly onto the template's range
    image_column: str = "image"
    score_column: str = "score"
    score_key: str = "score"  # key in a shard sample's json
    val_fraction: float = 0.1  # held out when the table has no split column
    head_seed: int = 0  # must match across all tasks of one bank
    seed: int = 0
    # Appendix F: head 1.5e-5→1.5e-6, batch 128, 60k steps; backbone 1.5e-6→1.5e-7, batch 32, 5k steps.
    head: StageConfig = field(default_factory=lambda: StageConfig(60_000, 128, 1.5e-5, 1.5e-6))
    backbone: StageConfig = field(default_factory=lambda: StageConfig(5_000, 32, 1.5e-6, 1.5e-7))
    device: str = "auto"
    workers: int = 4
    checkpoint_every: int = 1000  # steps
    val_batch_size: int = 128

    def task_name(self) -> str:
        return self.name or Path(self.database.rstrip("/")).stem

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed (not the device or worker count)."""
        d = self.to_json()
        for k in ("device", "workers", "checkpoint_every", "val_batch_size"):
            d.pop(k)
        return d


def load_job(path: str | Path, **overrides: Any) -> FinetuneConfig:
    """A FinetuneConfig from a job file's ``[finetune]`` table, with non-None overrides applied."""
    section = dict(read_toml(path).get("finetune", {}))
    return config_from_dict({**section, **{k: v for k, v in overrides.items() if v is not None}}, str(path))


def with_stage_steps(cfg: FinetuneConfig, head_steps: int | None = None,
                     backbone_steps: int | None = None) -> FinetuneConfig:
    """``cfg`` with the step counts of its stages replaced where given (the CLI's --head-steps/--backbone-steps)."""
    return replace(cfg, head=cfg.head if head_steps is None else replace(cfg.head, steps=head_steps),
                   backbone=cfg.backbone if backbone_steps is None else replace(cfg.backbone, steps=backbone_steps))


def config_from_dict(d: dict[str, Any], source: str = "config") -> FinetuneConfig:
    known = {f.name for f in fields(FinetuneConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise LaionfilterError(f"{source}: unknown setting(s) {', '.join(unknown)}")
    d = dict(d)
    defaults = FinetuneConfig(database="", base="")
    for stage in ("head", "backbone"):
        if isinstance(d.get(stage), dict):
            d[stage] = replace(getattr(defaults, stage), **d[stage])
    if d.get("score_range") is not None:
        d["score_range"] = tuple(float(x) for x in d["score_range"])
    for req in ("database", "base"):
        if not d.get(req):
            raise LaionfilterError(f"{source}: {req} is required")
    if d.get("scale", "1-10") not in SCALES:
        raise LaionfilterError(f"{source}: scale must be one of {', '.join(SCALES)}")
    return FinetuneConfig(**d)


def _batches(ds, batch_size: int, workers: int, seed: int, pin: bool) -> Iterator:
    """An endless stream of training batches, reshuffled (seeded) each epoch."""
    epoch = 0
    iterable = isinstance(ds, IterableDataset)
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        n = batch_size if iterable else min(batch_size, len(ds))
        loader = DataLoader(ds, batch_size=n, shuffle=not iterable, drop_last=True, generator=g,
                            num_workers=workers, pin_memory=pin, persistent_workers=False)
        got = False
        for batch in loader:
            got = True
            yield batch
        if not got:
            raise LaionfilterError("the training split yields no full batch")
        epoch += 1


@torch.no_grad()
def predict(model, ds, device, batch_size: int = 128, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, targets) over a whole dataset, in eval mode."""
    was_training = model.training
    model.eval()
    preds, ys = [], []
    for x, y in DataLoader(ds, batch_size=batch_size, num_workers=workers):
        with autocast(device):
            preds.append(model(x.to(device, non_blocking=True)).float().cpu())
        ys.append(y)
    model.train(was_training)
    if not preds:
        raise LaionfilterError("the validation split is empty")
    return torch.cat(preds).numpy(), torch.cat(ys).numpy()


def _val_metrics(model, val, device, cfg: FinetuneConfig, span: float) -> dict[str, float]:
    p, y = predict(model, val, device, cfg.val_batch_size, cfg.workers)
    return {"srocc": srocc(y, p), "plcc": plcc(y, p), "loss": float(np.mean(((p - y) / span) ** 2)), "n": int(len(y))}


def _save_checkpoint(ckpt: Path, model, opt, stage: str, step: int, cfg: FinetuneConfig, extra: dict) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model.{n}": t for n, t in model_state(model).items()}
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                tensors[f"opt.{names[id(p)]}.{k}"] = v.detach().float().reshape(v.shape)
    write_safetensors(ckpt / "state.safetensors", tensors, {"stage": stage, "step": step})
    write_json(ckpt / "state.json", {"stage": stage, "step": step, "config": cfg.identity(), **extra})


def _load_optimizer_state(opt, model, tensors: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt.{n}.")}
        if state:
            opt.state[p] = {k: v.to(p.device) for k, v in state.items()}


def finetune(cfg: FinetuneConfig, out: str | Path, progress: bool = True, resume: bool = True,
             allow_pipe: bool = False) -> dict[str, Any]:
    """Run phase 1 and write the task checkpoint to ``out``; returns its metadata. ``allow_pipe``: let
    ``pipe:`` shard URLs of the database run their commands."""
    out = Path(out)
    device = pick_device(cfg.device)
    arch, model = load_base(cfg.base, HeadConfig(seed=cfg.head_seed))
    base_fingerprint = state_fingerprint(model_state(model))
    template = SCALES[cfg.scale]
    model.template = torch.tensor(template)
    span = template[-1] - template[0]
    transform = eval_transform(arch)
    train, val = open_database(
        cfg.database, transform, template, image_column=cfg.image_column, score_column=cfg.score_column,
        score_key=cfg.score_key, raw_range=ScoreRange(*cfg.score_range) if cfg.score_range else None,
        val_fraction=cfg.val_fraction, seed=cfg.seed, allow_pipe=allow_pipe,
    )
    model.to(device)
    ckpt = out.with_name(out.name + ".ckpt")
    start_stage, start_step, history = "head", 0, {}
    if resume and (ckpt / "state.json").exists():
        state = read_json(ckpt / "state.json")
        if state.get("config") == cfg.identity():
            tensors, _ = read_safetensors(ckpt / "state.safetensors", what="checkpoint")
            from ..model import load_state

            load_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, ckpt)
            start_stage, start_step, history = state["stage"], state["step"], state.get("history", {})
            if progress:
                note(f"resuming {cfg.task_name()} from {ckpt} at {start_stage} step {start_step}")
        else:
            note(f"{ckpt}: checkpoint is of another configuration; starting afresh")
            tensors = {}
    else:
        tensors = {}
    if "before" not in history:
        history["before"] = _val_metrics(model, val, device, cfg, span)

    started = time.time()
    stages = [("head", cfg.head), ("backbone", cfg.backbone)]
    for idx, (stage, sc) in enumerate(stages):
        if [s for s, _ in stages].index(start_stage) > idx:
            continue
        first = start_step if stage == start_stage else 0
        if first >= sc.steps:
            continue
        head_only = stage == "head"
        for n, p in model.named_parameters():
            p.requires_grad_(not head_only or n.startswith("head."))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=sc.lr_start, weight_decay=sc.weight_decay)
        if first and tensors:
            _load_optimizer_state(opt, model, tensors)
        model.train()
        if head_only:
            model.visual.eval()
        stage_seed = cfg.seed * 7 + idx * 1_000_003 + first
        batches = _batches(train, sc.batch_size, cfg.workers, stage_seed, device.type == "cuda")
        torch.manual_seed(stage_seed)  # the head's dropout draws from the global generator: same seed, same task
        bar = progress_bar(range(first, sc.steps), desc=f"{cfg.task_name()} {stage}", unit="step", disable=not progress,
                           initial=first, total=sc.steps)
        losses = []
        for step in bar:
            lr = cosine_lr(step, sc.steps, sc.lr_start, sc.lr_end)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device):
                pred = model(x)
            # Loss on the template's span so the learning rates mean the same on 1–10 and 1–5 scales.
            loss = torch.mean(((pred.float() - y) / span) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{lr:.2e}", refresh=False)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < sc.steps:
                _save_checkpoint(ckpt, model, opt, stage, step + 1, cfg, {"history": history})
        bar.close()
        history[f"{stage}_train_loss_last"] = float(np.mean(losses[-50:])) if losses else None
        nxt = stages[idx + 1][0] if idx + 1 < len(stages) else stage
        _save_checkpoint(ckpt, model, opt, nxt, 0 if nxt != stage else sc.steps, cfg, {"history": history})
        tensors = {}

    after = _val_metrics(model, val, device, cfg, span)
    meta = {
        "format": TASK_FORMAT,
        "laionfilter_version": __version__,
        "name": cfg.task_name(),
        "database": cfg.database,
        "scale": cfg.scale,
        "template": list(template),
        "base": {"spec": cfg.base, "fingerprint": base_fingerprint},
        "architecture": arch.to_json(),
        "layers": layer_names(model),
        "metrics": {"val_srocc": after["srocc"], "val_plcc": after["plcc"], "val_loss": after["loss"],
                    "val_loss_before": history["before"]["loss"], "val_srocc_before": history["before"]["srocc"],
                    "n_val": after["n"], "train_seconds": round(time.time() - started, 1)},
        "config": cfg.to_json(),
    }
    write_safetensors(out, model_state(model), meta)
    write_json(out.with_name(out.name + ".config.json"), cfg.to_json())
    shutil.rmtree(ckpt, ignore_errors=True)  # the task file now holds everything the checkpoint did
    return meta
