"""Importing the paper authors' checkpoints: tiny files made in their exact layout.

Each file is ``torch.save({'model': sd})`` where ``sd`` holds ``backbone.*`` (a whole OpenCLIP CLIP
model, text tower included) and ``score_predictor.projection.{0,3}.*`` (the '3fc' head).
"""

import argparse
import os
import pickle
import shutil

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from laionfilter.authors import authors_preprocess, import_bank
from laionfilter.cli import cli
from laionfilter.errors import LaionfilterError
from laionfilter.images import Preprocessor
from laionfilter.model import register_configs
from laionfilter.safefiles import write_safetensors

from .helpers import good_samples

ARCH = "lf-tiny-vit"
TASKS = ("ava", "koniq", "spaq")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def clip_model(seed: int) -> nn.Module:
    register_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(ARCH).eval()


def authors_head(seed: int, embed: int) -> nn.Sequential:
    """Their AestheticScorePredictor('3fc').projection, randomly initialised."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(embed, 512), nn.GELU(), nn.Dropout(0.5), nn.Linear(512, 10), nn.Sigmoid()).eval()


def fine_tuned(base: nn.Module, seed: int) -> tuple[nn.Module, nn.Sequential]:
    """The base with its vision tower moved a little (text tower untouched, as in their training) and a head."""
    clip = clip_model(0)
    clip.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clip.visual.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return clip, authors_head(100 + seed, clip.visual.output_dim)


def save_authors(path, clip, head, **extra):
    sd = {f"backbone.{k}": v for k, v in clip.state_dict().items()}
    sd.update({f"score_predictor.projection.{k}": v for k, v in head.state_dict().items()})
    torch.save({"model": sd, **extra}, path)
    return path


def reference_score(clip, head, x) -> torch.Tensor:
    """The authors' forward: encode_image → head → normalise → dot 1..10."""
    with torch.no_grad():
        p = head(clip.encode_image(x))
        return (p / p.sum(1, keepdim=True)) @ torch.arange(1, 11, dtype=torch.float32)


@pytest.fixture(scope="module")
def authors(tmp_path_factory):
    root = tmp_path_factory.mktemp("authors")
    base = clip_model(0)
    base_file = write_safetensors(root / "open_clip_model.safetensors", base.state_dict(), {})
    models, files = [], []
    for i, t in enumerate(TASKS):
        clip, head = fine_tuned(base, i + 1)
        models.append((clip, head))
        files.append(save_authors(root / f"clip_L_3fc_{t}.pth", clip, head,
                                  args=argparse.Namespace(lr=1e-5, clip_model=ARCH), epoch=7))
    return {"root": root, "base": f"{ARCH}:{base_file}", "files": files, "models": models, "base_model": base}


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("float16", 2e-2)])
def test_each_imported_task_scores_like_the_authors_forward(authors, tmp_path, dtype, tol):
    bank = import_bank(authors["files"], authors["base"], tmp_path / "bank", dtype=dtype)
    assert [t["name"] for t in bank.tasks] == list(TASKS)
    assert bank.manifest["architecture"]["preprocess"]["resize_size"] == 73  # 64 · 256/224, then crop 64
    pre = Preprocessor(bank.architecture.preprocess)
    x = torch.stack([pre(s["jpg"]) for s in good_samples("a", 6, seed=1)])
    for i, (clip, head) in enumerate(authors["models"]):
        with torch.no_grad():
            ours = bank.task_model(i)(x)
        np.testing.assert_allclose(ours.numpy(), reference_score(clip, head, x).numpy(), atol=tol, rtol=0)


def test_theta_pre_head_is_the_mean_head_and_sums_to_one_do_not_depend_on_it(authors, tmp_path):
    bank = import_bank(authors["files"], authors["base"], tmp_path / "bank", dtype="float32")
    heads = [h for _, h in authors["models"]]
    torch.testing.assert_close(bank.pre["head.0.weight"], torch.stack([h[0].weight for h in heads]).mean(0))
    torch.testing.assert_close(bank.tau["head.3.bias"].sum(0), torch.zeros(10), atol=1e-5, rtol=0)  # Σ τ_head = 0
    alpha = torch.tensor([0.5, 0.3, 0.2])
    merged = bank.merged_state(alpha)["head.3.weight"]
    torch.testing.assert_close(merged, sum(a * h[3].weight for a, h in zip(alpha, heads)), atol=1e-5, rtol=0)


def test_the_authors_preprocessing_matches_torchvision_on_pil(authors):
    from PIL import Image
    from torchvision import transforms as T

    pre = authors_preprocess(224)
    ref = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                     T.Normalize(pre["mean"], pre["std"])])
    import io

    data = good_samples("p", 1, seed=3)[0]["jpg"]
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((300, 200))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    ours = Preprocessor(pre)(buf.getvalue())
    theirs = ref(img)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert (ours - theirs).abs().mul(torch.tensor(pre["std"])[:, None, None]).mean() < 2 / 255


def _refused(authors, tmp_path, files, match, base=None):
    out = tmp_path / "bank"
    with pytest.raises(LaionfilterError, match=match) as e:
        import_bank(files, base or authors["base"], out)
    assert "\n" not in str(e.value) and not out.exists()
    return str(e.value)


def test_a_wrong_base_is_refused_naming_base_and_tensor(authors, tmp_path):
    other = clip_model(5)
    other_file = write_safetensors(tmp_path / "other.safetensors", other.state_dict(), {})
    msg = _refused(authors, tmp_path, authors["files"], "text tower differs", base=f"{ARCH}:{other_file}")
    assert str(other_file) in msg and "first at backbone.positional_embedding" in msg


def test_a_vision_shape_mismatch_is_refused(authors, tmp_path):
    clip, head = authors["models"][0]
    sd = {f"backbone.{k}": v for k, v in clip.state_dict().items()}
    sd["backbone.visual.proj"] = torch.zeros(64, 32)
    sd.update({f"score_predictor.projection.{k}": v for k, v in head.state_dict().items()})
    torch.save({"model": sd}, tmp_path / "clip_L_3fc_bad.pth")
    _refused(authors, tmp_path, authors["files"][:1] + [tmp_path / "clip_L_3fc_bad.pth"], "visual.proj has shape")


def test_a_pickle_with_a_code_payload_is_refused_and_nothing_runs(authors, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "clip_L_3fc_evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": Payload()}, evil)
    _refused(authors, tmp_path, [evil], "restricted loader")
    legacy = tmp_path / "clip_L_3fc_legacy.pth"
    legacy.write_bytes(pickle.dumps({"model": Payload()}, protocol=2))
    msg = _refused(authors, tmp_path, [legacy], "restricted loader")
    assert "posix.system" in msg or "os.system" in msg or "Unsupported global" in msg, msg
    assert not marker.exists()


def test_a_file_without_a_model_key_is_refused(authors, tmp_path):
    clip, _ = authors["models"][0]
    torch.save({"state_dict": clip.state_dict()}, tmp_path / "x.pth")
    _refused(authors, tmp_path, [tmp_path / "x.pth"], "no 'model' key")


def test_a_file_without_text_tower_warns_and_imports(authors, tmp_path, capsys):
    clip, head = authors["models"][0]
    sd = {f"backbone.{k}": v for k, v in clip.state_dict().items() if k.startswith("visual.")}
    sd.update({f"score_predictor.projection.{k}": v for k, v in head.state_dict().items()})
    torch.save({"model": sd}, tmp_path / "clip_B_3fc_ava.pth")
    bank = import_bank([tmp_path / "clip_B_3fc_ava.pth"], authors["base"], tmp_path / "bank")
    assert bank.n == 1 and "cannot be verified" in capsys.readouterr().err


def test_learn_score_evaluate_and_inspect_on_an_imported_bank(authors, tmp_path):
    bank_dir = tmp_path / "bank"
    r = run("bank", "import", *authors["files"], "--base", authors["base"], "--out", bank_dir)
    assert r.exit_code == 0, r.output
    info = run("bank", "info", bank_dir)
    assert info.exit_code == 0 and "clip_L_3fc_koniq.pth" in info.output and "mean of the imported heads" in info.output
    imgs = tmp_path / "img"
    imgs.mkdir()
    samples = good_samples("r", 24, seed=8)
    rows = ["user,image,score"]
    for i, s in enumerate(samples):
        (imgs / f"{i}.jpg").write_bytes(s["jpg"])
        rows.append(f"u{i % 2},img/{i}.jpg,{(i * 7) % 10}")
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    r = run("learn", tmp_path / "r.csv", "--bank", bank_dir, "--out", tmp_path / "p", "--steps", "3", "--device", "cpu")
    assert r.exit_code == 0, r.output
    r = run("inspect", tmp_path / "p" / "u0.profile")
    assert r.exit_code == 0 and "koniq" in r.output
    from .helpers import write_shard

    write_shard(tmp_path / "s.tar", samples[:5])
    r = run("score", tmp_path / "s.tar", "--profile", tmp_path / "p", "--out", tmp_path / "scores", "--workers", "0",
            "--device", "cpu")
    assert r.exit_code == 0 and "5 images scored" in r.output, r.output
    r = run("evaluate", tmp_path / "r.csv", "--bank", bank_dir, "--shots", "2", "--trials", "1", "--steps", "2",
            "--device", "cpu")
    assert r.exit_code == 0 and "zero-shot ensemble" in r.output, r.output


def test_names_come_from_the_files_or_names(authors, tmp_path):
    shutil.copy(authors["files"][0], tmp_path / "mine.pth")
    bank = import_bank([tmp_path / "mine.pth"], authors["base"], tmp_path / "a")
    assert bank.tasks[0]["name"] == "mine"
    r = run("bank", "import", authors["files"][0], authors["files"][1], "--base", authors["base"], "--out",
            tmp_path / "b", "--names", "x,../y")
    assert r.exit_code == 1 and "not a plain name" in r.output and not (tmp_path / "b").exists()
