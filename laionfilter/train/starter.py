"""The starter bank: a real, small bank built offline from photos that ship inside PyPI packages.

Six image→score databases are made the way IQA databases are made: photos are cropped and distorted
at a random level along one documented criterion, and the score (1..10) says how little the criterion
is degraded. A tiny OpenCLIP ViT is first pretrained on the same training photos with a generic
objective (regressing a dozen image statistics, and a generic quality score through the score head), so
that every task starts from one shared θ_pre and moves a modest distance from it, as real banks start
from CLIP. Each database is then fine-tuned with the same ``finetune`` function as real databases, and
the results are packed with ``build_bank``.

Photos are split by source photo: ``train`` photos build the databases and the pretraining set,
``val`` photos the held-out validation rows, and ``eval`` photos are never seen by the bank at all; they
are reserved for evaluating personalisation and for the demo.
"""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..errors import LaionfilterError
from ..images import Preprocessor
from ..formats import BASE_FORMAT
from ..objective import cosine_lr
from ..log import progress_bar
from .finetune import FinetuneConfig, StageConfig, finetune
from ..model import HeadConfig, build_architecture, model_state
from ..safefiles import read_toml, write_json, write_safetensors

# Photos by split; a photo (and its near-duplicates) is on one side only.
PHOTOS = {
    "train": ["astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
              "motorcycle_left", "motorcycle_right", "brick", "camera", "moon", "page", "cell", "clock"],
    "val": ["chelsea", "grace_hopper", "grass", "text"],
    "eval": ["coffee", "china", "flower", "coins", "gravel"],
}
GREY = {"brick", "camera", "moon", "page", "text", "cell", "clock", "grass", "coins", "gravel"}


def load_photo(name: str) -> np.ndarray:
    """One bundled photo as an RGB uint8 array (grey photos are replicated to three channels)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        arr = load_sample_image(f"{name}.jpg")
    elif name == "grace_hopper":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            arr = np.asarray(Image.open(f).convert("RGB"))
    elif name.startswith("motorcycle_"):
        import skimage.data

        left, right, _ = skimage.data.stereo_motorcycle()
        arr = left if name.endswith("left") else right
    else:
        import skimage.data

        arr = getattr(skimage.data, name)()
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        arr = (255 * (arr.astype(np.float64) / max(arr.max(), 1))).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def photos(split: str) -> dict[str, np.ndarray]:
    return {name: load_photo(name) for name in PHOTOS[split]}


def random_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """A random square crop covering 25–100% of the shorter side, resized to ``size``, maybe mirrored."""
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.25, 1.0))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    img = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


# --- criteria: each maps a clean image and a degradation level u in [0, 1] to a degraded image ---

def _blur(img: Image.Image, u: float) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=2.5 * u)) if u > 0 else img


def _noise(img: Image.Image, u: float, rng: np.random.Generator) -> Image.Image:
    a = np.asarray(img, dtype=np.float32) + rng.normal(0, 60 * u, size=(img.height, img.width, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _exposure(img: Image.Image, u: float) -> Image.Image:
    # Under-exposure: linear light scaled down by up to 4 stops.
    a = (np.asarray(img, dtype=np.float32) / 255) ** 2.2 * 2.0 ** (-4 * u)
    return Image.fromarray((np.clip(a, 0, 1) ** (1 / 2.2) * 255).astype(np.uint8))


def _colour(img: Image.Image, u: float) -> Image.Image:
    a = np.asarray(img, dtype=np.float32)
    grey = a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return Image.fromarray(np.clip(grey[..., None] + (1 - u) * (a - grey[..., None]), 0, 255).astype(np.uint8))


def _contrast(img: Image.Image, u: float) -> Image.Image:
    a = np.asarray(img, dtype=np.float32)
    return Image.fromarray(np.clip(a.mean() + (1 - 0.85 * u) * (a - a.mean()), 0, 255).astype(np.uint8))


def _warmth(img: Image.Image, u: float) -> Image.Image:
    # White balance from warm (red up, blue down by 35%) at u = 0 to cool at u = 1.
    s = 0.35 * (1 - 2 * u)
    a = np.asarray(img, dtype=np.float32) * np.array([1 + s, 1, 1 - s], dtype=np.float32)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _jpeg_quality(u: float) -> int:
    return int(round(95 - 90 * u))  # 95 (clean) down to 5


@dataclass(frozen=True)
class Criterion:
    name: str
    description: str
    colour_only: bool = False  # grey photos carry no signal for it
    # A crop must show the criterion to be rated on it, as IQA databases pick their source content:
    # blur and JPEG artefacts are invisible on a flat patch, contrast on a uniform one, and so on.
    min_detail: float = 0.0  # mean absolute luminance gradient
    min_std: float = 0.0  # luminance standard deviation
    min_saturation: float = 0.0
    min_brightness: float = 0.0

    def shows_on(self, img: Image.Image) -> bool:
        a = np.asarray(img, dtype=np.float32) / 255
        lum = a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        detail = np.abs(np.diff(lum, axis=1)).mean() + np.abs(np.diff(lum, axis=0)).mean()
        mx = a.max(-1)
        sat = ((mx - a.min(-1)) / np.maximum(mx, 1e-3)).mean()
        return (detail >= self.min_detail and lum.std() >= self.min_std and sat >= self.min_saturation
                and lum.mean() >= self.min_brightness)


CRITERIA = {
    "sharpness": Criterion("sharpness", "Gaussian blur of radius 0–2.5 px at 64 px; sharper scores higher",
                           min_detail=0.04),
    "noise": Criterion("noise", "additive Gaussian noise of σ 0–60 (of 255); cleaner scores higher"),
    "exposure": Criterion("exposure", "under-exposure by 0–4 stops in linear light; brighter scores higher",
                          min_brightness=0.2),
    "colourfulness": Criterion("colourfulness", "saturation scaled from 1 to 0 towards grey; more colourful scores higher",
                               colour_only=True, min_saturation=0.15),
    "contrast": Criterion("contrast", "contrast scaled from 1 down to 0.15 around the mean; more contrast scores higher",
                          min_std=0.06),
    "warmth": Criterion("warmth", "white balance from warm (R +35%, B −35%) to cool (R −35%, B +35%); warmer scores higher"),
    # Learned only to SROCC 0.53 on validation photos by the tiny ViT at 64 px, so it is kept out of the
    # starter bank; the personalisation benchmark uses it as a taste that no task covers.
    "jpeg": Criterion("jpeg", "JPEG compression at quality 95 down to 5; higher quality scores higher",
                      min_detail=0.04),
}


def usable_crop(photo: np.ndarray, crit: Criterion, size: int, rng: np.random.Generator, tries: int = 30):
    """A random crop on which the criterion shows, or None if the photo yields none."""
    for _ in range(tries):
        img = random_crop(photo, size, rng)
        if crit.shows_on(img):
            return img
    return None


def degraded(img: Image.Image, criterion: str, u: float, rng: np.random.Generator) -> Image.Image:
    """The image degraded along a criterion other than jpeg (whose degradation is its encoding)."""
    return {"sharpness": lambda: _blur(img, u), "noise": lambda: _noise(img, u, rng),
            "exposure": lambda: _exposure(img, u), "colourfulness": lambda: _colour(img, u),
            "contrast": lambda: _contrast(img, u), "warmth": lambda: _warmth(img, u)}[criterion]()


def degrade(img: Image.Image, criterion: str, u: float, rng: np.random.Generator) -> tuple[bytes, str]:
    """The degraded image encoded as a file: lossless PNG, except JPEG for the jpeg criterion."""
    buf = io.BytesIO()
    if criterion == "jpeg":
        img.save(buf, format="JPEG", quality=_jpeg_quality(u))
        return buf.getvalue(), "jpg"
    degraded(img, criterion, u, rng).save(buf, format="PNG")
    return buf.getvalue(), "png"


def level_to_score(u: float) -> float:
    return 1.0 + 9.0 * (1.0 - u)


@dataclass(frozen=True)
class StarterConfig:
    """Settings of the starter bank (mirrored in jobs/starter-bank.toml; a test keeps them equal)."""

    arch: str = "lf-tiny-vit"
    criteria: tuple[str, ...] = ("sharpness", "noise", "exposure", "colourfulness", "contrast", "warmth")
    train_crops: int = 2000  # per database, from the train photos
    val_crops: int = 200  # per database, from the val photos
    pretrain_steps: int = 600
    pretrain_batch_size: int = 64
    pretrain_lr: tuple[float, float] = (1e-3, 1e-5)
    pretrain_images: int = 3000
    head: StageConfig = field(default_factory=lambda: StageConfig(150, 64, 1e-3, 1e-4))
    backbone: StageConfig = field(default_factory=lambda: StageConfig(300, 32, 2e-4, 2e-5))
    seed: int = 0
    dtype: str = "float16"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_starter_job(path: str | Path) -> StarterConfig:
    d = read_toml(path).get("starter", {})
    unknown = set(d) - {f.name for f in fields(StarterConfig)}
    if unknown:
        raise LaionfilterError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    for stage in ("head", "backbone"):
        if stage in d:
            d[stage] = StageConfig(**d[stage])
    for k in ("criteria", "pretrain_lr"):
        if k in d:
            d[k] = tuple(d[k])
    return StarterConfig(**d)


def make_database(criterion: str, out: Path, cfg: StarterConfig, size: int) -> Path:
    """Write one criterion's database (image files and ``<criterion>.csv`` with a split column)."""
    crit = CRITERIA[criterion]
    rng = np.random.default_rng([cfg.seed, list(CRITERIA).index(criterion)])
    (out / criterion).mkdir(parents=True, exist_ok=True)
    rows = ["image,score,split,photo,level"]
    for split, count in (("train", cfg.train_crops), ("val", cfg.val_crops)):
        names = [n for n in PHOTOS[split] if not (crit.colour_only and n in GREY)]
        pics = {n: load_photo(n) for n in names}
        i = misses = 0
        while i < count:
            name = names[(i + misses) % len(names)]
            crop = usable_crop(pics[name], crit, size, rng)
            if crop is None:
                misses += 1
                if misses > 100 * len(names):
                    raise LaionfilterError(f"starter {criterion}: the {split} photos show it on too few crops")
                continue
            u = float(rng.uniform())
            data, ext = degrade(crop, criterion, u, rng)
            rel = f"{criterion}/{split}-{i:05d}.{ext}"
            (out / rel).write_bytes(data)
            rows.append(f"{rel},{level_to_score(u):.4f},{split},{name},{u:.4f}")
            i += 1
    table = out / f"{criterion}.csv"
    table.write_text("\n".join(rows) + "\n")
    return table


# --- pretraining of θ_pre ---

def image_stats(img: Image.Image) -> np.ndarray:
    """Twelve generic image statistics: colour means, tone, saturation, detail, noise, blockiness."""
    a = np.asarray(img, dtype=np.float32) / 255
    lum = a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    mx, mn = a.max(-1), a.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1e-3)
    lap = lum[1:-1, 1:-1] * 4 - lum[:-2, 1:-1] - lum[2:, 1:-1] - lum[1:-1, :-2] - lum[1:-1, 2:]
    gx, gy = np.diff(lum, axis=1), np.diff(lum, axis=0)
    blur = np.asarray(Image.fromarray((lum * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1)), np.float32) / 255
    rg, yb = a[..., 0] - a[..., 1], 0.5 * (a[..., 0] + a[..., 1]) - a[..., 2]
    colourful = math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())
    hist = np.histogram(lum, bins=32, range=(0, 1))[0] / lum.size
    entropy = -(hist[hist > 0] * np.log2(hist[hist > 0])).sum() / 5
    col = np.abs(gx)
    block = col[:, 7::8].mean() / max(col.mean(), 1e-4) if col.shape[1] > 8 else 1.0
    return np.array([
        a[..., 0].mean(), a[..., 1].mean(), a[..., 2].mean(), lum.std() * 3, sat.mean(),
        math.log10(lap.var() + 1e-6) / 3 + 2, (np.abs(gx).mean() + np.abs(gy).mean()) * 5,
        np.median(np.abs(lum - blur)) * 20, colourful * 3, entropy, min(block, 4) / 2, (lum < 0.1).mean(),
    ], dtype=np.float32)


def _pretrain_set(cfg: StarterConfig, size: int) -> tuple[list[Image.Image], np.ndarray, np.ndarray]:
    """Crops of the train photos with random mixed degradations, their statistics and generic quality."""
    rng = np.random.default_rng([cfg.seed, 99])
    pics = photos("train")
    names = list(pics)
    images, stats, quality = [], [], []
    for i in range(cfg.pretrain_images):
        img = random_crop(pics[names[i % len(names)]], size, rng)
        levels = []
        for c in cfg.criteria:
            if rng.random() < 0.4:
                u = float(rng.uniform())
                img = Image.open(io.BytesIO(degrade(img, c, u, rng)[0])).convert("RGB")
                levels.append(u)
        images.append(img)
        stats.append(image_stats(img))
        quality.append(level_to_score(float(np.clip(np.sum(levels), 0, 1))))
    return images, np.stack(stats), np.array(quality, dtype=np.float32)


def pretrain_base(cfg: StarterConfig, out: Path, progress: bool = True) -> Path:
    """θ_pre for the starter bank: the tiny ViT and its head pretrained on a generic objective."""
    arch, model = build_architecture(cfg.arch, HeadConfig(seed=cfg.seed))
    from ..model import eval_transform

    transform = eval_transform(arch)
    size = transform.size[0]
    images, stats, quality = _pretrain_set(cfg, size)
    x_all = torch.stack([transform(im) for im in images])
    s_all, q_all = torch.from_numpy(stats), torch.from_numpy(quality)
    aux = torch.nn.Linear(model.head[0].out_features, stats.shape[1])
    torch.manual_seed(cfg.seed)
    params = list(model.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.pretrain_lr[0], weight_decay=0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    bar = progress_bar(range(cfg.pretrain_steps), desc="starter: pretrain base", unit="step", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.pretrain_steps, *cfg.pretrain_lr)
        idx = torch.randint(0, len(x_all), (cfg.pretrain_batch_size,), generator=gen)
        feats = model.visual(x_all[idx])
        hidden = model.head[1](model.head[0](feats))
        loss_stats = torch.mean((aux(hidden) - s_all[idx]) ** 2)
        probs = model.head[4](model.head[3](model.head[2](hidden)))
        pred_q = (probs / probs.sum(-1, keepdim=True)) @ model.template
        loss_q = torch.mean(((pred_q - q_all[idx]) / 9) ** 2)
        loss = loss_stats + loss_q
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(stats=f"{loss_stats.item():.4f}", quality=f"{loss_q.item():.4f}", refresh=False)
    meta = {"format": BASE_FORMAT, "architecture": arch.to_json(), "starter": cfg.to_json()}
    return write_safetensors(out, model_state(model), meta)


def build_starter(out: str | os.PathLike, cfg: StarterConfig = StarterConfig(), progress: bool = True,
                  workdir: str | os.PathLike | None = None):
    """Build the starter bank into ``out`` (databases and task checkpoints kept under ``workdir``)."""
    from ..bank import build_bank

    out = Path(out)
    work = Path(workdir) if workdir else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    arch, _ = build_architecture(cfg.arch, HeadConfig(seed=cfg.seed))
    size = Preprocessor(arch.preprocess).size[0]
    base = work / "base.safetensors"
    if not base.exists():
        pretrain_base(cfg, base, progress)
    tasks = []
    for criterion in cfg.criteria:
        if criterion not in CRITERIA:
            raise LaionfilterError(f"unknown starter criterion {criterion!r}; known: {', '.join(CRITERIA)}")
        task = work / "tasks" / f"{criterion}.safetensors"
        if not task.exists():
            table = make_database(criterion, work / "databases", cfg, size)
            ft = FinetuneConfig(database=str(table), base=f"{cfg.arch}:{base}", name=criterion, head_seed=cfg.seed,
                                seed=cfg.seed, head=cfg.head, backbone=cfg.backbone, device="cpu", workers=0,
                                checkpoint_every=0)
            finetune(ft, task, progress=progress)
        tasks.append(task)
    bank = build_bank(tasks, out, dtype=cfg.dtype)
    write_json(out / "starter.json", {"config": cfg.to_json(), "photos": PHOTOS,
                                      "criteria": {c: CRITERIA[c].description for c in cfg.criteria},
                                      "build_seconds": round(time.time() - started, 1)})
    return bank
