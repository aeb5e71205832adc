import json
import shutil

import pytest
from click.testing import CliRunner

from laionfilter.cli import cli
from laionfilter.evaluate import BEST_SINGLE, ZERO_SHOT, default_methods, evaluate, markdown_table, summarise
from laionfilter.learn import LearnConfig
from laionfilter.metrics import srocc


@pytest.fixture
def users_table(tmp_path, ratings_csv):
    shutil.copytree(ratings_csv.parent / "img", tmp_path / "img")
    lines = ratings_csv.read_text().splitlines()[1:]
    rows = ["user,image,score"]
    for line in lines:
        img, score = line.split(",")
        rows.append(f"ann,{img},{score}")
        rows.append(f"bob,{img},{11 - int(score)}")  # the opposite taste
    (tmp_path / "users.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "users.csv"


def test_protocol_pairs_splits_and_summarises(users_table, small_bank):
    methods = {k: v for k, v in default_methods(LearnConfig(steps=2, device="cpu")).items()
               if k in (ZERO_SHOT, BEST_SINGLE, "learned, adaptive init")}
    result = evaluate(users_table, small_bank, shots=(5,), trials=2, methods=methods, progress=False)
    runs = result["runs"]
    assert {r["user"] for r in runs} == {"ann", "bob"} and len(runs) == 2 * 2 * 3
    # The zero-shot ensemble ranks the two opposite users' test images in exactly opposite ways.
    for t in range(2):
        ann = next(r for r in runs if r["user"] == "ann" and r["trial"] == t and r["method"] == ZERO_SHOT)
        bob = next(r for r in runs if r["user"] == "bob" and r["trial"] == t and r["method"] == ZERO_SHOT)
        assert ann["srocc"] == pytest.approx(-bob["srocc"], abs=1e-9)
    table = markdown_table(result)
    assert "| zero-shot ensemble |" in table and "5-shot SROCC" in table
    again = evaluate(users_table, small_bank, shots=(5,), trials=2, methods=methods, progress=False)
    assert again["runs"] == runs  # seeded: same splits, same numbers


def test_summary_is_mean_over_users_and_std_over_trials():
    runs = [{"user": u, "shots": 10, "trial": t, "method": "m", "srocc": s}
            for u, t, s in [("a", 0, 0.2), ("b", 0, 0.4), ("a", 1, 0.6), ("b", 1, 0.8)]]
    [s] = summarise(runs)
    assert s["mean"] == pytest.approx(0.5) and s["std_over_trials"] == pytest.approx(0.2)
    assert s["per_user"] == {"a": pytest.approx(0.4), "b": pytest.approx(0.6)}


def test_too_few_images_for_the_shots_are_skipped_with_a_note(users_table, small_bank, capsys):
    methods = {ZERO_SHOT: ZERO_SHOT}
    r = evaluate(users_table, small_bank, shots=(5, 20), trials=1, methods=methods, progress=False)
    assert {x["shots"] for x in r["runs"]} == {5}
    assert "too few for 20 shots" in capsys.readouterr().err


def test_cli_evaluate(users_table, small_bank, tmp_path):
    r = CliRunner().invoke(cli, ["evaluate", str(users_table), "--bank", str(small_bank.path), "--shots", "5",
                                 "--trials", "1", "--steps", "2", "--device", "cpu",
                                 "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    assert "| learned, adaptive init |" in r.output and "| MSE loss (adaptive) |" in r.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["runs"]) == 2 * len(data["methods"])
    assert (tmp_path / "p.png").stat().st_size > 1000
    r = CliRunner().invoke(cli, ["evaluate", str(users_table), "--bank", str(small_bank.path), "--shots", "x"])
    assert r.exit_code == 2 and "comma-separated" in r.output


def test_srocc_handles_constant_inputs():
    assert srocc([1, 2, 3], [5, 5, 5]) == 0.0
    assert srocc([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
