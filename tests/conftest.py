import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from laionfilter.finetune import FinetuneConfig, StageConfig, finetune  # noqa: E402
from laionfilter.starter import StarterConfig, make_database  # noqa: E402

TINY = "lf-tiny-vit"
SMALL = StarterConfig(train_crops=96, val_crops=48)


@pytest.fixture(scope="session")
def databases(tmp_path_factory) -> dict[str, Path]:
    """Small real-photo databases (sharpness, noise, colourfulness) written by the starter's generator."""
    root = tmp_path_factory.mktemp("databases")
    return {c: make_database(c, root, SMALL, 64) for c in ("sharpness", "noise", "colourfulness")}


def quick_config(database: Path, name: str, **kw) -> FinetuneConfig:
    base = dict(database=str(database), base=TINY, name=name, device="cpu", workers=0, checkpoint_every=0,
                head=StageConfig(12, 32, 2e-3, 2e-4), backbone=StageConfig(12, 16, 5e-4, 5e-5), val_batch_size=64)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture(scope="session")
def tasks(tmp_path_factory, databases) -> list[Path]:
    """Three task checkpoints fine-tuned briefly from one random tiny base."""
    root = tmp_path_factory.mktemp("tasks")
    out = []
    for name, db in databases.items():
        path = root / f"{name}.safetensors"
        finetune(quick_config(db, name), path, progress=False)
        out.append(path)
    return out
