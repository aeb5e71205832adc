import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from laionfilter.bank import build_bank, load_bank
from laionfilter.cli import cli
from laionfilter.errors import LaionfilterError
from laionfilter.train.finetune import finetune
from laionfilter.safefiles import read_safetensors, write_safetensors

from .conftest import quick_config


@pytest.fixture(scope="module")
def bank32(tasks, tmp_path_factory):
    return build_bank(tasks, tmp_path_factory.mktemp("bank") / "b", dtype="float32")


def test_round_trip_is_bit_exact(bank32, tasks):
    again = load_bank(bank32.path)
    assert again.fingerprint == bank32.fingerprint
    for layer in bank32.layers:
        assert torch.equal(again.pre[layer], bank32.pre[layer]) and torch.equal(again.tau[layer], bank32.tau[layer])
    for i, t in enumerate(tasks):
        ft, _ = read_safetensors(t)
        for layer in bank32.layers:
            assert torch.equal(again.tau[layer][i], ft[layer] - again.pre[layer])  # τ_i = θ_ft_i − θ_pre, stored as is


def test_pre_plus_tau_gives_back_each_task(bank32, tasks):
    for i, t in enumerate(tasks):
        ft, _ = read_safetensors(t)
        state = bank32.task_state(i)
        for layer in bank32.layers:
            torch.testing.assert_close(state[layer], ft[layer], rtol=0, atol=1e-6)


def test_task_model_scores_like_the_fine_tuned_model(bank32, tasks):
    from laionfilter.model import load_base

    _, direct = load_base(f"lf-tiny-vit:{tasks[1]}")
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bank32.task_model(1)(x), direct.eval()(x), rtol=1e-5, atol=1e-5)


def test_half_precision_storage_is_close_and_smaller(bank32, tasks, tmp_path):
    half = build_bank(tasks, tmp_path / "half", dtype="float16")
    assert half.tau[half.layers[0]].dtype == torch.float16
    assert (half.path / "weights.safetensors").stat().st_size < (bank32.path / "weights.safetensors").stat().st_size
    for layer in half.layers:
        torch.testing.assert_close(half.tau[layer].float(), bank32.tau[layer], rtol=1e-3, atol=1e-4)
    assert half.fingerprint != bank32.fingerprint


def test_a_task_from_another_base_is_refused(tasks, databases, tmp_path):
    other = tmp_path / "other.safetensors"
    finetune(quick_config(databases["noise"], "other", head_seed=7), other, progress=False)
    with pytest.raises(LaionfilterError, match=rf"{other}: fine-tuned from another base"):
        build_bank([tasks[0], other], tmp_path / "bank")


def test_a_task_model_scores_on_its_own_template(tasks, databases, tmp_path):
    five = tmp_path / "five.safetensors"
    finetune(quick_config(databases["noise"], "five", scale="1-5", score_range=(1.0, 10.0)), five, progress=False)
    bank = build_bank([tasks[0], five], tmp_path / "bank", dtype="float32")
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        on_its_scale = bank.task_model(1)(x)
        merged = bank.model(bank.task_state(1))(x)  # what learning and scoring use: 1..10
    torch.testing.assert_close(on_its_scale, merged / 2)  # 0.5..5 is 1..10 halved: the same ranking
    assert float(on_its_scale.max()) <= 5


def test_tampered_bank_is_refused(bank32, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bank32.path, copy)
    tensors, meta = read_safetensors(copy / "weights.safetensors")
    tensors[f"tau.{bank32.layers[0]}"] = tensors[f"tau.{bank32.layers[0]}"] + 1
    write_safetensors(copy / "weights.safetensors", tensors, meta)
    with pytest.raises(LaionfilterError, match="fingerprint"):
        load_bank(copy)


def test_a_bank_is_read_layer_by_layer_when_used(bank32, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bank32.path, copy)
    bank = load_bank(copy)
    assert bank.parameters == sum(t.numel() for t in bank32.pre.values())
    layer = bank.layers[0]
    first = bank.tau[layer]
    assert torch.equal(first, bank32.tau[layer]) and set(bank.pre) == set(bank32.layers)
    (copy / "weights.safetensors").unlink()  # gone after loading: the next read says which file and tensor
    with pytest.raises(LaionfilterError, match=rf"{copy / 'weights.safetensors'}: cannot read pre.{layer}"):
        bank.pre[layer]
    with pytest.raises(KeyError):
        bank32.pre["no.such.layer"]
    assert torch.equal(first, bank32.tau[layer])  # what was read stays valid


def test_wrong_shaped_tensor_in_a_bank(bank32, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bank32.path, copy)
    tensors, meta = read_safetensors(copy / "weights.safetensors")
    tensors["pre.visual.proj"] = torch.zeros(2, 2)
    write_safetensors(copy / "weights.safetensors", tensors, meta)
    with pytest.raises(LaionfilterError, match=rf"{copy / 'weights.safetensors'}: tensor pre.visual.proj has shape \(2, 2\)"):
        load_bank(copy, verify=False)


def test_similarity_matrix(bank32):
    sim = bank32.similarity()
    assert sim.shape == (3, 3)
    np.testing.assert_allclose(np.diag(sim), 1, atol=1e-9)
    np.testing.assert_allclose(sim, sim.T)
    flat = [torch.cat([bank32.tau[l][i].flatten() for l in bank32.layers]) for i in range(3)]
    expect = torch.nn.functional.cosine_similarity(flat[0], flat[2], dim=0).item()
    assert sim[0, 2] == pytest.approx(expect, abs=1e-5)


def test_cli_build_and_info(tasks, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-bank"
    r = runner.invoke(cli, ["bank", "build", *map(str, tasks), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "3 tasks × 60 layers" in r.output
    r = runner.invoke(cli, ["bank", "info", str(out), "--plot", str(tmp_path / "sim.png")])
    assert r.exit_code == 0, r.output
    for name in ("sharpness", "noise", "colourfulness", "cosine similarity", "L = 60"):
        assert name in r.output
    assert (tmp_path / "sim.png").read_bytes()[:4] == b"\x89PNG"
    info = json.loads(runner.invoke(cli, ["bank", "info", str(out), "--json"]).output)
    assert info["n"] == 3 and info["L"] == 60 and len(info["similarity"]) == 3
    r = runner.invoke(cli, ["bank", "info", str(tmp_path / "none")])
    assert r.exit_code == 1 and "no such bank folder" in r.output and "Traceback" not in r.output


def test_every_file_is_validated_against_its_schema_on_load(bank32, tasks, profiles, tmp_path):
    import shutil

    from laionfilter.formats import BANK_FORMAT, PROFILE_FORMAT, TASK_FORMAT, validate
    from laionfilter.profile import load_profile

    manifest = json.loads((bank32.path / "manifest.json").read_text())
    validate(manifest, BANK_FORMAT, "m")
    _, meta = read_safetensors(tasks[0])
    validate(meta, TASK_FORMAT, "t")
    with pytest.raises(LaionfilterError, match="m: malformed laionfilter.bank/1 metadata at layers"):
        validate(dict(manifest, layers="not a list"), BANK_FORMAT, "m")
    with pytest.raises(LaionfilterError, match="at base/fingerprint"):
        validate(dict(manifest, base={"spec": "x", "fingerprint": "nothex"}), BANK_FORMAT, "m")
    # on load: a bank whose manifest lost a field, a profile whose metadata lost one
    broken = tmp_path / "bank"
    shutil.copytree(bank32.path, broken)
    (broken / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "shapes"}))
    with pytest.raises(LaionfilterError, match="'shapes' is a required property"):
        load_bank(broken)
    tensors, pmeta = read_safetensors(profiles[0])
    write_safetensors(tmp_path / "p.profile", tensors, {k: v for k, v in pmeta.items() if k != "layers"})
    with pytest.raises(LaionfilterError, match="p.profile: malformed laionfilter.profile/1.*'layers'"):
        load_profile(tmp_path / "p.profile")
    validate(pmeta, PROFILE_FORMAT, "p")
