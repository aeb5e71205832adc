import json
from dataclasses import replace

import pytest
import torch

from laionfilter.train import finetune as ft_module
from laionfilter.errors import LaionfilterError
from laionfilter.objective import cosine_lr
from laionfilter.train.finetune import FinetuneConfig, StageConfig, finetune, load_job
from laionfilter.safefiles import read_safetensors

from .conftest import quick_config


def test_finetuning_lowers_the_validation_loss(tasks):
    _, meta = read_safetensors(tasks[2])  # colourfulness: learnable in 40 steps from a random base
    m = meta["metrics"]
    assert m["val_loss"] < 0.8 * m["val_loss_before"] and m["val_srocc"] > 0.5
    assert m["n_val"] == 48
    assert meta["format"] == "laionfilter.task/1" and meta["base"]["spec"] == "lf-tiny-vit"
    assert len(meta["layers"]) == 60  # 56 tower tensors (6 + 4 blocks × 12 + 2) + 4 head tensors


def test_head_stage_leaves_the_backbone_untouched(databases, tmp_path):
    cfg = quick_config(databases["noise"], "noise", backbone=StageConfig(0, 16, 1e-4, 1e-5))
    finetune(cfg, tmp_path / "t.safetensors", progress=False)
    tuned, _ = read_safetensors(tmp_path / "t.safetensors")
    from laionfilter.model import load_base, model_state

    _, base = load_base("lf-tiny-vit")
    pre = model_state(base)
    assert all(torch.equal(tuned[n], pre[n]) for n in pre if n.startswith("visual."))
    assert not torch.equal(tuned["head.3.weight"], pre["head.3.weight"])


def test_the_same_seed_gives_the_same_task_model(databases, tmp_path):
    # The head's dropout draws from torch's global generator: unseeded, two runs differed in every weight.
    # The second run starts from whatever the first left in that generator.
    short = dict(head=StageConfig(4, 16, 3e-3, 3e-4), backbone=StageConfig(4, 16, 1e-3, 1e-4))
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        finetune(quick_config(databases["noise"], "noise", seed=seed, **short), tmp_path / f"{name}.safetensors",
                 progress=False)
    a, b, c = (read_safetensors(tmp_path / f"{n}.safetensors")[0] for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.3.weight"], c["head.3.weight"])


def test_interrupted_finetune_resumes_from_its_checkpoint(databases, tmp_path, monkeypatch, capsys):
    cfg = quick_config(databases["colourfulness"], "sharp", checkpoint_every=5)
    out = tmp_path / "sharp.safetensors"
    real_save = ft_module._save_checkpoint
    saved = []

    def save_then_die(ckpt, model, opt, stage, step, *a, **k):
        real_save(ckpt, model, opt, stage, step, *a, **k)
        saved.append((stage, step))
        if stage == "backbone" and step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft_module, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, out, progress=True)
    assert not out.exists() and (tmp_path / "sharp.safetensors.ckpt" / "state.json").exists()
    state = json.loads((tmp_path / "sharp.safetensors.ckpt" / "state.json").read_text())
    assert (state["stage"], state["step"]) == ("backbone", 5)
    saved.clear()
    meta = finetune(cfg, out, progress=True)
    assert "resuming sharp" in capsys.readouterr().err
    assert saved[0] == ("backbone", 10)  # went on from step 5, not from the start
    assert saved[-1] == ("backbone", 20)
    assert out.exists() and meta["metrics"]["val_loss"] < meta["metrics"]["val_loss_before"]
    assert not (tmp_path / "sharp.safetensors.ckpt").exists()


def test_cosine_schedule_ends():
    assert cosine_lr(0, 100, 1e-2, 1e-3) == pytest.approx(1e-2)
    assert cosine_lr(99, 100, 1e-2, 1e-3) == pytest.approx(1e-3)
    assert cosine_lr(50, 101, 1.0, 0.0) == pytest.approx(0.5)


def test_scores_outside_the_template_need_a_score_range(tmp_path, databases):
    table = tmp_path / "t.csv"
    rows = databases["noise"].read_text().splitlines()
    folder = databases["noise"].parent
    body = [f"{folder / r.split(',')[0]},{float(r.split(',')[1]) * 10},{r.split(',')[2]}" for r in rows[1:]]
    table.write_text("image,score,split\n" + "\n".join(body) + "\n")
    with pytest.raises(LaionfilterError, match="outside the template's range 1.0..10.0.*--score-range"):
        finetune(quick_config(table, "x"), tmp_path / "x.safetensors", progress=False)
    meta = finetune(quick_config(table, "x", score_range=(10.0, 100.0), head=StageConfig(2, 8, 1e-3, 1e-4),
                                 backbone=StageConfig(0, 8, 1e-4, 1e-5)), tmp_path / "x.safetensors", progress=False)
    assert tuple(meta["config"]["score_range"]) == (10.0, 100.0) and meta["metrics"]["val_loss"] < 1


def test_bad_database_rows_are_all_reported(tmp_path):
    table = tmp_path / "db.csv"
    table.write_text("image,score\nmissing.png,5\nalso-missing.png,abc\n")
    with pytest.raises(LaionfilterError) as e:
        finetune(quick_config(table, "x"), tmp_path / "x.safetensors", progress=False)
    msg = str(e.value)
    assert "row 2: image 'missing.png' not found" in msg and "row 3: score 'abc' is not a number" in msg


def test_paper_job_files_hold_appendix_f(pytest_root=None):
    from pathlib import Path

    jobs = sorted((Path(__file__).parent.parent / "jobs").glob("finetune-*.toml"))
    names = {p.stem.removeprefix("finetune-") for p in jobs}
    assert {"ava", "flickr-aes", "tad66k", "para", "koniq-10k", "spaq"} <= names
    for p in jobs:
        cfg = load_job(p, database="x.parquet", base="ViT-B-16:laion2b_s34b_b88k")
        assert (cfg.head.steps, cfg.head.batch_size, cfg.head.lr_start, cfg.head.lr_end) == (60_000, 128, 1.5e-5, 1.5e-6)
        assert (cfg.backbone.steps, cfg.backbone.batch_size, cfg.backbone.lr_start, cfg.backbone.lr_end) == (5_000, 32, 1.5e-6, 1.5e-7)
    assert FinetuneConfig(database="d", base="b").head == load_job(jobs[0], database="d", base="b").head


def test_job_file_with_unknown_setting(tmp_path):
    job = tmp_path / "j.toml"
    job.write_text('[finetune]\ndatabase = "x.csv"\nbase = "lf-tiny-vit"\nlearning_rate = 3\n')
    with pytest.raises(LaionfilterError, match="unknown setting.*learning_rate"):
        load_job(job)


def test_finetune_reads_shards_with_scores_in_their_json(databases, tmp_path):
    import csv
    import json

    from .helpers import write_shard

    with open(databases["sharpness"]) as f:
        rows = list(csv.DictReader(f))[:60]
    folder = databases["sharpness"].parent
    samples = [{"__key__": f"k{i:04d}", "png": (folder / r["image"]).read_bytes(),
                "json": json.dumps({"score": float(r["score"])}).encode()} for i, r in enumerate(rows)]
    (tmp_path / "shards").mkdir()
    for s in range(3):
        write_shard(tmp_path / "shards" / f"{s:05d}.tar", samples[s::3])
    cfg = quick_config(str(tmp_path / "shards"), "sharp-shards", workers=2)
    meta = finetune(cfg, tmp_path / "t.safetensors", progress=False)
    n_val = meta["metrics"]["n_val"]
    assert 0 < n_val < 60 and meta["name"] == "sharp-shards"
    # a broken shard is an error naming it, never a silent skip
    data = (tmp_path / "shards" / "00001.tar").read_bytes()
    (tmp_path / "shards" / "00001.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(LaionfilterError, match="00001.tar: cannot read shard"):
        finetune(replace(cfg, workers=0), tmp_path / "u.safetensors", progress=False, resume=False)
