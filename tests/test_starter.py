import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from laionfilter.train.finetune import StageConfig
from laionfilter.safefiles import read_json
from laionfilter.train.starter import (CRITERIA, PHOTOS, StarterConfig, build_starter, degrade, image_stats,
                                 load_photo, load_starter_job, random_crop)

ROOT = Path(__file__).parent.parent


def test_job_file_holds_the_built_in_settings():
    assert load_starter_job(ROOT / "jobs" / "starter-bank.toml") == StarterConfig()


def test_photo_splits_are_disjoint_and_load():
    seen = [n for names in PHOTOS.values() for n in names]
    assert len(seen) == len(set(seen))
    assert {"motorcycle_left", "motorcycle_right"} <= set(PHOTOS["train"])  # a stereo pair stays on one side
    for name in seen:
        arr = load_photo(name)
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and min(arr.shape[:2]) >= 100


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_each_criterion_degrades_monotonically(criterion):
    # More degradation moves the matching statistic one way, measured on a real photo crop.
    import io

    from PIL import Image

    img = random_crop(load_photo("astronaut"), 64, np.random.default_rng(1))
    measure = {"sharpness": lambda s: s[6], "noise": lambda s: s[7], "exposure": lambda s: s[3],
               "colourfulness": lambda s: s[4], "contrast": lambda s: s[3], "jpeg": lambda s: s[10],
               "warmth": lambda s: s[0] - s[2]}[criterion]  # red minus blue mean
    sign = {"noise": 1, "jpeg": 1}.get(criterion, -1)
    values = []
    for u in (0.0, 0.5, 1.0):
        data, _ = degrade(img, criterion, u, np.random.default_rng(2))
        values.append(measure(image_stats(Image.open(io.BytesIO(data)).convert("RGB"))) * sign)
    assert values[0] < values[1] < values[2] or criterion == "jpeg" and values[0] < values[2]


def test_small_starter_build(tmp_path):
    cfg = replace(StarterConfig(), criteria=("noise", "colourfulness"), train_crops=64, val_crops=32,
                  pretrain_steps=5, pretrain_images=64, head=StageConfig(4, 16, 1e-3, 1e-4),
                  backbone=StageConfig(4, 16, 1e-4, 1e-5))
    bank = build_starter(tmp_path / "bank", cfg, progress=False)
    assert [t["name"] for t in bank.tasks] == ["noise", "colourfulness"]
    assert bank.manifest["base"]["spec"].startswith("lf-tiny-vit:")
    assert bank.tau[bank.layers[0]].dtype.is_floating_point and bank.manifest["dtype"] == "float16"
    info = read_json(tmp_path / "bank" / "starter.json")
    assert info["photos"]["eval"] == PHOTOS["eval"]
    # The reserved evaluation photos never reach a database; grey photos never rate colourfulness.
    for criterion in cfg.criteria:
        with open(tmp_path / "bank.work" / "databases" / f"{criterion}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 96
        photos = {r["photo"] for r in rows}
        assert not photos & set(PHOTOS["eval"])
        assert {r["photo"] for r in rows if r["split"] == "val"} <= set(PHOTOS["val"])
        if criterion == "colourfulness":
            assert not photos & {"camera", "moon", "grass", "text"}


@pytest.mark.parametrize("criterion", ["sharpness", "noise", "exposure", "colourfulness", "contrast", "warmth"])
def test_shipped_task_models_rank_degradations_of_unseen_photos(criterion):
    # Each task model orders degraded versions of the reserved evaluation photos by its own criterion.
    import torch

    from laionfilter.images import Preprocessor
    from laionfilter.metrics import srocc
    from laionfilter.bank import resolve_bank

    bank = resolve_bank("starter")
    i = [t["name"] for t in bank.tasks].index(criterion)
    model, pre = bank.task_model(i), Preprocessor(bank.architecture.preprocess)
    rng = np.random.default_rng(3)
    levels, pixels = [], []
    for name in ("coffee", "china", "flower"):
        photo = load_photo(name)
        for _ in range(8):
            crop = CRITERIA[criterion]
            from laionfilter.train.starter import usable_crop

            img = usable_crop(photo, crop, 64, rng)
            u = float(rng.uniform())
            levels.append(u)
            pixels.append(pre(degrade(img, criterion, u, rng)[0]))
    with torch.no_grad():
        pred = model(torch.stack(pixels)).numpy()
    assert srocc([-u for u in levels], pred) > 0.6
