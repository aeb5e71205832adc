"""The score model: an OpenCLIP vision tower plus the unified regression head (appendix D).

One code path builds it from an OpenCLIP architecture name with a pretrained tag
(``ViT-B-16:laion2b_s34b_b88k``), an architecture with a local safetensors checkpoint
(``ViT-B-16:/path/to/open_clip_model.safetensors``), or an architecture alone (random weights,
e.g. the tiny configs in ``model_configs/`` that tests and the starter bank use).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from .errors import LaionfilterError
from .safefiles import read_safetensors, state_fingerprint

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False

# Score templates: the head's 10 probabilities are dotted with one of these (appendix D).
SCALES = {"1-10": tuple(float(i) for i in range(1, 11)), "1-5": tuple(0.5 * i for i in range(1, 11))}


def register_configs() -> None:
    """Make laionfilter's own OpenCLIP configs (tiny test/starter towers) known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


@dataclass(frozen=True)
class HeadConfig:
    hidden: int = 512  # width of the hidden layer (appendix D)
    outputs: int = 10  # score bins, dotted with the template
    dropout: float = 0.5
    seed: int = 0  # one seeded initialisation shared by every task, so head deltas are task vectors


@dataclass(frozen=True)
class BaseSpec:
    """Where θ_pre comes from: ``ARCH``, ``ARCH:PRETRAINED_TAG`` or ``ARCH:PATH.safetensors``."""

    arch: str
    pretrained: str | None = None  # an open_clip pretrained tag, downloaded by open_clip
    checkpoint: str | None = None  # a local safetensors file

    @classmethod
    def parse(cls, text: str) -> "BaseSpec":
        arch, sep, rest = text.partition(":")
        if not arch:
            raise LaionfilterError(f"base {text!r}: expected ARCH, ARCH:PRETRAINED or ARCH:PATH")
        if not sep or not rest:
            return cls(arch)
        if "/" in rest or rest.endswith((".safetensors", ".pt", ".pth", ".bin")) or Path(rest).exists():
            return cls(arch, checkpoint=rest)
        return cls(arch, pretrained=rest)

    def __str__(self) -> str:
        return self.arch + (f":{self.pretrained}" if self.pretrained else "") + (f":{self.checkpoint}" if self.checkpoint else "")


class ScoreHead(nn.Sequential):
    """Linear(embed, 512) → GELU → Dropout(0.5) → Linear(512, 10) → Sigmoid.

    Profiles that share the tower compute their heads together (``scorer._Heads``): the first layer's
    weight is a linear combination of the bank's, so its products are combined rather than recomputed.
    What that needs of the layout is here, beside the layers: the first weight's name, the rest's, and the
    head's maths after the first product, for K profiles at once.
    """

    FIRST_WEIGHT = "head.0.weight"  # [hidden, embed]
    REST = ("head.0.bias", "head.3.weight", "head.3.bias")  # [hidden], [outputs, hidden], [outputs]

    def __init__(self, embed_dim: int, cfg: HeadConfig):
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.seed)
        try:
            super().__init__(
                nn.Linear(embed_dim, cfg.hidden),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.hidden, cfg.outputs),
                nn.Sigmoid(),
            )
        finally:
            torch.random.set_rng_state(gen_state)

    @staticmethod
    def after_first_product(products: torch.Tensor, b0: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
        """The head's output [K, N, outputs] for K profiles, from their first layer's products without bias
        [K, N, hidden] and their own ``REST`` tensors stacked ([K, hidden], [K, outputs, hidden], [K, outputs]).
        The second layer runs as W · Gᵀ, [K, outputs, N]: G · Wᵀ, a product only 10 wide, ran 3.8× slower on
        the CPU (MKL, 8 profiles × 32 images: 186 against 49 µs)."""
        hidden = nn.functional.gelu(products.add_(b0[:, None]))  # dropout is the identity at inference
        return torch.sigmoid(torch.bmm(w3, hidden.transpose(1, 2)).add_(b3[:, :, None])).transpose(1, 2)


class ScoreModel(nn.Module):
    """Image → score on a database's scale: the expected value of the normalised 10-bin head output."""

    def __init__(self, visual: nn.Module, head: ScoreHead, template: tuple[float, ...] = SCALES["1-10"]):
        super().__init__()
        self.visual = visual
        self.head = head
        self.register_buffer("template", torch.tensor(template, dtype=torch.float32), persistent=False)

    def forward(self, images: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The score; with ``stop``, ``trunk(images, stop)``; with ``start``, ``tail(images, start)`` of
        features from ``trunk(·, start)``. Through ``forward``, so that ``functional_call`` runs the
        split forwards with weights of its own."""
        if stop is not None:
            return self.trunk(images, stop)
        if start:
            return self.tail(images, start)
        return self.head_score(self.visual(images))

    def head_score(self, features: torch.Tensor) -> torch.Tensor:
        """The score head on the tower's features, in float32 under autocast too.

        The head is 0.3 % of ViT-B-16's weights and its output is the score itself. Profiles that share
        the tower compute their heads as combinations of products (``scorer._Heads``); that agrees with
        this to float32 tolerance only when neither is rounded to bf16 (on an H200 the two differed by
        1.9 % of the scores' range with the head under bf16 autocast; benchmarks/profiles.py --check).
        """
        with torch.autocast(features.device.type, enabled=False):
            return self.score(self.head(features.float()))

    def score(self, probs: torch.Tensor) -> torch.Tensor:
        probs = probs.float()
        probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs @ self.template

    # Split forwards: the model as stages (see ``layer_stage``), so that profiles sharing their first
    # stages can run them once. ``trunk(x, s)`` runs stages < s, ``tail(h, s)`` the rest, and
    # ``tail(trunk(x, s), s)`` equals ``forward(x)`` for every s in 1..n_blocks + 2.

    @property
    def n_blocks(self) -> int:
        return len(self.visual.transformer.resblocks)

    def splittable(self) -> bool:
        """An OpenCLIP VisionTransformer, whose stages the split forwards know."""
        v = self.visual
        return all(hasattr(v, a) for a in ("_embeds", "_pool", "transformer", "proj")) and \
            hasattr(v.transformer, "resblocks")

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if not v.transformer.batch_first:
            x = x.transpose(0, 1)
        pooled, _ = v._pool(x)
        return pooled @ v.proj if v.proj is not None else pooled

    def trunk(self, images: torch.Tensor, split: int) -> torch.Tensor:
        v, blocks = self.visual, self.n_blocks
        x = v._embeds(images)
        if not v.transformer.batch_first:
            x = x.transpose(0, 1)
        for r in v.transformer.resblocks[:min(split - 1, blocks)]:
            x = r(x)
        return self._finish(x) if split == blocks + 2 else x

    def tail(self, h: torch.Tensor, split: int) -> torch.Tensor:
        blocks = self.n_blocks
        if split <= blocks + 1:
            for r in self.visual.transformer.resblocks[split - 1:]:
                h = r(h)
            h = self._finish(h)
        return self.head_score(h)


_STEM = ("visual.conv1.", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.")
_BLOCK = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.")


def count_blocks(layers: list[str]) -> int:
    """Transformer blocks in a list of layer names."""
    return len({m.group(1) for m in map(_BLOCK.match, layers) if m})


def layer_stage(name: str, n_blocks: int) -> int:
    """The stage a layer (parameter) belongs to, in forward order: 0 the stem (patch embedding, class and
    position embeddings, ln_pre), 1..n_blocks the transformer blocks, n_blocks + 1 what follows them in
    the tower (ln_post, proj), n_blocks + 2 the score head."""
    if name.startswith("head."):
        return n_blocks + 2
    if name.startswith(_STEM):
        return 0
    m = _BLOCK.match(name)
    return int(m.group(1)) + 1 if m else n_blocks + 1


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild the network shape and its eval preprocessing (saved in manifests)."""

    name: str  # OpenCLIP model name
    model_config: dict[str, Any]  # OpenCLIP's config (embed_dim, vision_cfg, ...) for that name
    preprocess: dict[str, Any]  # size, mean, std, interpolation, resize_mode
    head: HeadConfig = field(default_factory=HeadConfig)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocess"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.preprocess.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Architecture":
        return cls(d["name"], d["model_config"], d["preprocess"], HeadConfig(**d.get("head", {})))


def _ensure_arch_known(name: str, model_config: dict[str, Any] | None = None) -> None:
    register_configs()
    if name in open_clip.list_models():
        return
    if model_config is None:
        raise LaionfilterError(
            f"unknown OpenCLIP architecture {name!r}; known ones include ViT-B-16, ViT-L-14 "
            "(see open_clip.list_models())"
        )
    # A manifest carries the config of an architecture this machine does not know: register it.
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"{name}.json"
        p.write_text(json.dumps(model_config))
        open_clip.add_model_config(p)


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _QuietRandomInit(logging.Filter):
    # open_clip warns on every random init; random weights are intended for the tiny configs.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


def _create_clip(arch: str, pretrained: str | None, seed: int, device: str | None = None) -> nn.Module:
    try:
        quiet = _QuietRandomInit()
        logging.getLogger().addFilter(quiet)
        try:
            # On "meta", built there too: open_clip would otherwise build the whole model (text tower
            # included) in memory before moving it, a transient the size of the model.
            with _seeded(seed), (torch.device("meta") if device == "meta" else contextlib.nullcontext()):
                clip = open_clip.create_model(arch, pretrained=pretrained, require_pretrained=bool(pretrained),
                                              **({"device": device} if device else {}))
        finally:
            logging.getLogger().removeFilter(quiet)
    except LaionfilterError:
        raise
    except Exception as e:  # open_clip raises many kinds (hub offline, unknown tag, ...)
        raise LaionfilterError(
            f"could not build OpenCLIP {arch!r}" + (f" with pretrained weights {pretrained!r}" if pretrained else "")
            + f": {e}" + (" (no model hub reachable? use ARCH:/path/to/weights.safetensors)" if pretrained else "")
        ) from None
    return clip


def _create_visual(arch: str, pretrained: str | None, seed: int, device: str | None = None) -> nn.Module:
    clip = _create_clip(arch, pretrained, seed, device)
    visual = clip.visual
    del clip
    return visual


def preprocess_of(visual: nn.Module) -> dict[str, Any]:
    cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    cfg.pop("mode", None)
    cfg.pop("fill_color", None)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def build_architecture(arch: str, head: HeadConfig = HeadConfig(), model_config: dict[str, Any] | None = None,
                       preprocess: dict[str, Any] | None = None, empty: bool = False) -> tuple[Architecture, ScoreModel]:
    """A randomly initialised score model of the given architecture (seeded: same arch, same weights).

    ``empty``: parameters on the meta device, neither allocated nor initialised (to be assigned), and
    no text tower built on the way: 0.07 s for ViT-B-16 here against 1.6 s."""
    _ensure_arch_known(arch, model_config)
    visual = _create_visual(arch, None, head.seed, "meta" if empty else None)
    if empty:
        with torch.device("meta"):
            head_module = ScoreHead(visual.output_dim, head)
    else:
        head_module = ScoreHead(visual.output_dim, head)
    model = ScoreModel(visual, head_module)
    pre = preprocess or preprocess_of(visual)
    return Architecture(arch, model_config or open_clip.get_model_config(arch), pre, head), model


def load_base(spec: BaseSpec | str, head: HeadConfig = HeadConfig()) -> tuple[Architecture, ScoreModel]:
    """θ_pre as a ScoreModel, from a pretrained tag, a local safetensors checkpoint, or random weights.

    A local checkpoint may be an OpenCLIP state dict (``visual.*`` keys; text tower keys are ignored)
    or a laionfilter checkpoint (``visual.*`` and ``head.*``). Where it has no head, the head is the
    seeded initialisation.
    """
    arch, model, _ = load_base_clip(spec, head)
    return arch, model


def load_base_clip(spec: BaseSpec | str, head: HeadConfig = HeadConfig()
                   ) -> tuple[Architecture, ScoreModel, dict[str, torch.Tensor]]:
    """``load_base``, plus the rest of the OpenCLIP model (text tower, ``logit_scale``): every tensor
    whose name does not start with ``visual.``, as the base has it."""
    spec = BaseSpec.parse(spec) if isinstance(spec, str) else spec
    _ensure_arch_known(spec.arch)
    clip = _create_clip(spec.arch, spec.pretrained, head.seed)
    visual = clip.visual
    rest = {k: v.detach() for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    del clip
    model = ScoreModel(visual, ScoreHead(visual.output_dim, head))
    if spec.checkpoint:
        tensors, _ = read_safetensors(spec.checkpoint, what="checkpoint")
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
        load_state(model, tensors, spec.checkpoint, require_head=False)
        rest = {k: v for k, v in tensors.items() if not k.startswith(("visual.", "head."))}
    return Architecture(spec.arch, open_clip.get_model_config(spec.arch), preprocess_of(visual), head), model, rest


def load_state(model: ScoreModel, tensors: dict[str, torch.Tensor], source: str | Path, require_head: bool = True,
               assign: bool = False) -> None:
    """Copy ``visual.*`` and ``head.*`` tensors into the model, checking names and shapes; ``assign``
    makes the tensors themselves the parameters (no copy; for a model built ``empty``)."""
    own = dict(model.named_parameters())
    wanted = [n for n in own if require_head or n.startswith("visual.")]
    missing = [n for n in wanted if n not in tensors]
    if missing:
        raise LaionfilterError(
            f"{source}: missing {len(missing)} of the model's {len(wanted)} tensors "
            f"(first: {', '.join(missing[:3])}); is it a checkpoint of this architecture?"
        )
    for name, param in own.items():
        if name in tensors and tuple(tensors[name].shape) != tuple(param.shape):
            raise LaionfilterError(
                f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, the model expects {tuple(param.shape)}"
            )
    if assign:
        model.load_state_dict({n: tensors[n].to(own[n].dtype) for n in own}, strict=False, assign=True)
        return
    with torch.no_grad():
        for name, param in own.items():
            if name in tensors:
                param.copy_(tensors[name].to(param.dtype))


def layer_names(model: nn.Module) -> list[str]:
    """The model's 'layers' in the paper's sense: one per parameter tensor, in registration order."""
    return [n for n, _ in model.named_parameters()]


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}


def weights_fingerprint(model: nn.Module) -> str:
    return state_fingerprint(model_state(model))


def eval_transform(arch: Architecture):
    """The model's eval preprocessing: open_clip's (resize, centre crop, normalise), on tensors.

    Takes encoded bytes, a path, a PIL image or a uint8 tensor; see ``images.Preprocessor``.
    """
    from .images import Preprocessor

    return Preprocessor(arch.preprocess)
