"""Importing the paper authors' released task models (``clip_{B,L}_3fc_<task>.pth``) into a bank.

Each file is ``torch.save({'model': state_dict, ...})`` of the authors' ``MultiModalIAA``:
``backbone.*`` is a whole OpenCLIP CLIP model (vision and text towers) and
``score_predictor.projection.{0,3}.*`` is the '3fc' head, the same head as ours (Linear → GELU →
Dropout → Linear → Sigmoid, normalised and dotted with 1..10). A score is ``head(encode_image(x))``.

This is the one place where laionfilter reads a pickle-format file, and it does so only through
PyTorch's restricted loader (``weights_only=True``), which accepts tensors and plain containers and
refuses anything that would run code. The file's text tower never takes part in the forward pass, so
fine-tuning left it as the pretrained model had it: it must equal the ``--base`` text tower exactly,
which proves the vision tower started from that base too.

θ_pre is the base's vision tower and, for the head, the mean of the imported heads: the authors' own
random initial head is not in the files. With the mean, each head's task vector is as small as it can
be, and whenever the coefficients of a layer sum to 1 (as the adaptive initialisation's do) the merged
head Σ α_i h_i does not depend on this choice at all.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .bank import DTYPES, Bank, write_bank
from .errors import LaionfilterError
from .log import note
from .model import SCALES, BaseSpec, HeadConfig, layer_names, load_base_clip, model_state
from .names import check_distinct, check_name
from .safefiles import file_sha256, state_fingerprint

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
# The authors' transform: Resize(256, bicubic) → CenterCrop(224) → ToTensor → Normalize(OpenAI).
RESIZE_RATIO = 256 / 224
HEAD_KEYS = {"score_predictor.projection.0": "head.0", "score_predictor.projection.3": "head.3"}
DATABASES = {"ava": "AVA", "aes": "Flickr-AES", "tad": "TAD66K", "para": "PARA", "koniq": "KonIQ-10k",
             "spaq": "SPAQ"}
SOURCE = "Yun & Choo, ECCV 2024: released fine-tuned models (github.com/YeolJ00/Personalized-Aesthetics)"


def authors_preprocess(size: int) -> dict[str, Any]:
    """The authors' eval transform; for a model of another input size, the same resize/crop ratio."""
    return {"size": [size, size], "resize_size": round(size * RESIZE_RATIO), "mean": OPENAI_MEAN, "std": OPENAI_STD,
            "interpolation": "bicubic", "resize_mode": "shortest"}


def task_name_of(path: Path) -> str:
    """``clip_L_3fc_ava.pth`` → ``ava``; any other file name → its stem."""
    m = re.fullmatch(r"clip_[A-Za-z0-9]+_\dfc_(.+)", path.stem)
    return m.group(1) if m else path.stem


def _restricted_load(path: Path) -> Any:
    # argparse.Namespace (training options saved beside the weights) only holds attributes.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # A file in torch's legacy (non-zip) format cannot be memory-mapped: read it whole.
            return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``model`` state dict of an authors' checkpoint, through PyTorch's restricted loader only."""
    path = Path(path)
    if not path.is_file():
        raise LaionfilterError(f"{path}: no such checkpoint")
    try:
        obj = _restricted_load(path)
    except Exception as e:  # UnpicklingError for code, RuntimeError for a file torch cannot read, ...
        # torch's own text advises turning the restriction off; pass on only the line that says what was refused.
        lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
        why = next((x for x in lines if "unsupported global" in x.lower() or "WeightsUnpickler" in x), lines[0])
        raise LaionfilterError(f"{path}: refused by PyTorch's restricted loader (weights_only=True), which loads "
                               f"only tensors and plain containers: {why[:300]}") from None
    if not isinstance(obj, dict) or "model" not in obj:
        keys = ", ".join(map(repr, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        raise LaionfilterError(f"{path}: no 'model' key (has {keys}); not one of the authors' checkpoints")
    sd = obj["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LaionfilterError(f"{path}: its 'model' entry is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _check_against_base(path: Path, sd: dict[str, torch.Tensor], pre: dict[str, torch.Tensor],
                        text: dict[str, torch.Tensor], base: str) -> dict[str, torch.Tensor]:
    """The file's score-model weights (our names), after checking its towers against the base."""
    theirs = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    if not theirs:
        raise LaionfilterError(f"{path}: no backbone.* tensors; not one of the authors' checkpoints")
    vision = {k: v for k, v in theirs.items() if k.startswith("visual.")}
    want = {k for k in pre if k.startswith("visual.")}
    if set(vision) != want:
        extra, missing = sorted(set(vision) - want), sorted(want - set(vision))
        raise LaionfilterError(f"{path}: its vision tower's tensors differ from the base {base}'s "
                               f"({len(missing)} missing, first {missing[:1]}; {len(extra)} extra, first {extra[:1]})")
    for k in sorted(want):
        if tuple(vision[k].shape) != tuple(pre[k].shape):
            raise LaionfilterError(f"{path}: tensor backbone.{k} has shape {tuple(vision[k].shape)}, the base {base} "
                                   f"has {tuple(pre[k].shape)}; another architecture?")
    file_text = {k: v for k, v in theirs.items() if not k.startswith("visual.")}
    if not file_text:
        note(f"{path}: holds no text tower, so its base cannot be verified; trusting --base {base}")
    else:
        for k in sorted(text):
            if k not in file_text or file_text[k].shape != text[k].shape or not torch.equal(file_text[k].float(),
                                                                                                text[k].float()):
                raise LaionfilterError(
                    f"{path}: was not fine-tuned from the base {base}: its text tower differs (first at backbone.{k}); "
                    "pass the --base it was trained from (the authors' default is ViT-L-14:datacomp_xl_s13b_b90k)")
    weights = dict(vision)
    for theirs_prefix, ours in HEAD_KEYS.items():
        for part in ("weight", "bias"):
            key = f"{theirs_prefix}.{part}"
            if key not in sd:
                raise LaionfilterError(f"{path}: no {key}; not a '3fc' score head")
            weights[f"{ours}.{part}"] = sd[key]
    for k in (k for k in pre if k.startswith("head.")):
        if tuple(weights[k].shape) != tuple(pre[k].shape):
            raise LaionfilterError(f"{path}: head tensor {k} has shape {tuple(weights[k].shape)}, expected "
                                   f"{tuple(pre[k].shape)}")
    return weights


def import_bank(checkpoints: list[str | os.PathLike], base: str, out: str | os.PathLike, dtype: str = "float16",
                names: list[str] | None = None) -> Bank:
    """Turn the authors' checkpoints into a bank: every file is checked before anything is written, and
    only one checkpoint is in memory at a time (memory-mapped), beside θ_pre and the bank being built."""
    paths = [Path(c) for c in checkpoints]
    if not paths:
        raise LaionfilterError("bank import needs at least one checkpoint")
    if dtype not in DTYPES:
        raise LaionfilterError(f"--dtype must be one of {', '.join(DTYPES)}")
    if names is not None and len(names) != len(paths):
        raise LaionfilterError(f"--names gives {len(names)} names for {len(paths)} checkpoints")
    names = [check_name(n, "task name", p) for n, p in zip(names or [task_name_of(p) for p in paths], paths)]
    check_distinct(names, "task names (give them with --names)")
    spec = BaseSpec.parse(base)
    arch, base_model, text = load_base_clip(spec, HeadConfig())
    pre = model_state(base_model)
    layers = layer_names(base_model)
    del base_model

    heads = []
    for p in paths:  # first pass: refuse any bad file before writing anything
        weights = _check_against_base(p, read_checkpoint(p), pre, text, str(spec))
        heads.append({k: v.float().clone() for k, v in weights.items() if k.startswith("head.")})
    for k in heads[0]:
        pre[k] = torch.stack([h[k] for h in heads]).mean(0)
    del heads

    tau = {l: torch.empty((len(paths), *pre[l].shape), dtype=DTYPES[dtype]) for l in layers}
    for i, p in enumerate(paths):  # second pass: one file at a time
        weights = _check_against_base(p, read_checkpoint(p), pre, text, str(spec))
        for l in layers:
            tau[l][i] = (weights[l].float() - pre[l]).to(DTYPES[dtype])
        del weights

    size = arch.preprocess["size"]
    arch = replace(arch, preprocess=authors_preprocess(size if isinstance(size, int) else size[0]))
    tasks = [{"name": n, "database": DATABASES.get(n, n), "scale": "1-10", "template": list(SCALES["1-10"]),
              "metrics": {"val_srocc": None, "val_plcc": None}, "source": p.name,
              "source_sha256": file_sha256(p).hexdigest()}
             for n, p in zip(names, paths)]
    base_record = {"spec": str(spec), "fingerprint": state_fingerprint({l: pre[l] for l in layers if l.startswith("visual.")})}
    extra = {"imported": {"from": SOURCE, "head_pre": "mean of the imported heads",
                          "preprocess": "Resize(256, bicubic) → CenterCrop(224) → Normalize(OpenAI CLIP mean/std), "
                                        "scaled to the model's input size"}}
    return write_bank(out, arch, base_record, layers, pre, tau, dtype, tasks, extra)
