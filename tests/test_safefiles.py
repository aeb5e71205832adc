import pickle

import pytest
import torch

from laionfilter.bank import build_bank, load_bank
from laionfilter.errors import LaionfilterError
from laionfilter.model import load_base
from laionfilter.safefiles import read_safetensors, write_safetensors


def test_pickled_file_is_refused_by_name(tmp_path):
    path = tmp_path / "task.safetensors"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(LaionfilterError, match=rf"{path}: this is a pickled PyTorch file"):
        read_safetensors(path)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"w": 1}, protocol=4))
    with pytest.raises(LaionfilterError, match=rf"{raw}: this is a pickled"):
        load_base(f"lf-tiny-vit:{raw}")


def test_corrupt_truncated_and_missing_files_name_the_file(tmp_path):
    good = write_safetensors(tmp_path / "good.safetensors", {"w": torch.ones(1000)}, {"x": 1})
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LaionfilterError, match=rf"{cut}: corrupt or truncated"):
        read_safetensors(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello, this is not a tensor file at all")
    with pytest.raises(LaionfilterError, match=rf"{junk}: not a safetensors file"):
        read_safetensors(junk)
    with pytest.raises(LaionfilterError, match=rf"{tmp_path / 'nope.safetensors'}: no such"):
        read_safetensors(tmp_path / "nope.safetensors")
    tensors, meta = read_safetensors(good)
    assert meta == {"x": 1} and torch.equal(tensors["w"], torch.ones(1000))


def test_wrong_shaped_tensor_names_file_and_tensor(tmp_path):
    _, model = load_base("lf-tiny-vit")
    state = {f"{n}": p.detach().clone() for n, p in model.named_parameters()}
    state["visual.proj"] = torch.zeros(3, 3)
    path = write_safetensors(tmp_path / "bad.safetensors", state, {})
    with pytest.raises(LaionfilterError, match=rf"{path}: tensor visual.proj has shape \(3, 3\)"):
        load_base(f"lf-tiny-vit:{path}")


def test_missing_bank_and_manifest(tmp_path):
    with pytest.raises(LaionfilterError, match="no such bank folder"):
        load_bank(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LaionfilterError, match="manifest.json: no such bank manifest"):
        load_bank(tmp_path / "empty")


def test_nothing_is_ever_unpickled(tasks, tmp_path, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    bank = build_bank(tasks, tmp_path / "bank")
    load_bank(bank.path).task_model(0)


def test_package_source_unpickles_only_the_authors_checkpoints_and_only_restricted():
    import re
    from pathlib import Path

    import laionfilter

    for f in Path(laionfilter.__file__).parent.rglob("*.py"):
        text = f.read_text()
        for bad in ("pickle.load", "weights_only=False"):
            assert bad not in text, f"{f} contains {bad}"
        calls = re.findall(r"torch\.load\(([^)]*)\)", text)
        if f.name == "authors.py":
            assert calls and all("weights_only=True" in c for c in calls), calls
        else:
            assert not calls, f"{f} calls torch.load"
