import json
import shutil

import pytest
from click.testing import CliRunner

from laionfilter.cli import cli
from laionfilter.errors import LaionfilterError
from laionfilter.evaluate import (BEST_SINGLE, ZERO_SHOT, evaluate, markdown_table, methods_named, split_runs,
                                  summarise)
from laionfilter.recipe import LearnConfig
from laionfilter.metrics import srocc


def test_protocol_pairs_splits_and_summarises(users_table, small_bank):
    methods = methods_named(LearnConfig(steps=2, device="cpu"), [ZERO_SHOT, BEST_SINGLE, "the paper's recipe"])
    result = evaluate(users_table, small_bank, shots=(5,), trials=2, methods=methods, progress=False, jobs=1)
    runs = result["runs"]
    assert {r["user"] for r in runs} == {"ann", "bob"} and len(runs) == 2 * 2 * 3
    # Recompute the zero-shot ensemble and the best single task by hand on the documented split
    # (seeded by seed, user index, K and trial).
    import numpy as np

    from laionfilter.merger import Merger
    from laionfilter.model import eval_transform
    from laionfilter.ratings import read_ratings

    sups = read_ratings(users_table, eval_transform(small_bank.architecture)).supports
    merger = Merger(small_bank, __import__("torch").device("cpu"))
    for u, sup in enumerate(sups):
        preds = merger.task_predictions(sup.pixels)
        for t in range(2):
            perm = np.random.default_rng([0, u, 5, t]).permutation(len(sup.scores))
            s_idx, t_idx = np.sort(perm[:5]), np.sort(perm[5:])
            got = {r["method"]: r["srocc"] for r in runs if r["user"] == sup.user and r["trial"] == t}
            assert got[ZERO_SHOT] == pytest.approx(srocc(sup.scores[t_idx], preds[:, t_idx].mean(0)), abs=1e-6)
            best = int(np.argmax([srocc(sup.scores[s_idx], p[s_idx]) for p in preds]))
            assert got[BEST_SINGLE] == pytest.approx(srocc(sup.scores[t_idx], preds[best, t_idx]), abs=1e-6)
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in markdown_table(result).splitlines()[2:]}
    mean = next(x["mean"] for x in result["summary"] if x["method"] == ZERO_SHOT)
    assert rows[ZERO_SHOT].startswith(f"{mean:.3f} ± ")  # the table shows the summary's numbers
    again = evaluate(users_table, small_bank, shots=(5,), trials=2, methods=methods, progress=False, jobs=2)
    assert again["runs"] == runs  # seeded: same splits, same numbers, in the same order, two splits at a time
    # One split run alone, on a fresh merger, gives that split's runs of the whole evaluation: a
    # benchmark may farm splits out to processes.
    alone = split_runs(Merger(small_bank, __import__("torch").device("cpu")), sups[1], 1, 5, 1, methods, 0,
                       merger.task_predictions(sups[1].pixels))
    assert alone == [r for r in runs if r["user"] == sups[1].user and r["trial"] == 1]


def test_summary_is_mean_over_users_and_std_over_trials():
    runs = [{"user": u, "shots": 10, "trial": t, "method": "m", "srocc": s, "mae": {"linear": e}}
            for u, t, s, e in [("a", 0, 0.2, 1.0), ("b", 0, 0.4, 2.0), ("a", 1, 0.6, 2.0), ("b", 1, 0.8, 3.0)]]
    [s] = summarise(runs)
    assert s["mean"] == pytest.approx(0.5) and s["std_over_trials"] == pytest.approx(0.2)
    assert s["per_user"] == {"a": pytest.approx(0.4), "b": pytest.approx(0.6)}
    assert s["mae"] == {"linear": pytest.approx(2.0)} and s["mae_std_over_trials"] == {"linear": pytest.approx(0.5)}


def test_too_few_images_for_the_shots_are_skipped_with_a_note(users_table, small_bank, capsys):
    methods = {ZERO_SHOT: ZERO_SHOT}
    r = evaluate(users_table, small_bank, shots=(5, 20), trials=1, methods=methods, progress=False)
    assert {x["shots"] for x in r["runs"]} == {5}
    assert "too few for 20 shots" in capsys.readouterr().err


def test_cli_evaluate(users_table, small_bank, tmp_path):
    r = CliRunner().invoke(cli, ["evaluate", str(users_table), "--bank", str(small_bank.path), "--shots", "5",
                                 "--trials", "1", "--steps", "2", "--device", "cpu",
                                 "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["runs"]) == 2 * len(data["methods"]) and "the paper's recipe" in data["methods"]
    assert all(f"| {name} |" in r.output for name in data["methods"])
    default = [run for run in data["runs"] if run["method"] == "the default"]
    assert len(default) == 2 and all(run["mae"]["isotonic"] >= 0 for run in default)  # calibrated, as learn
    assert "Rating MAE" in r.output
    printed = CliRunner().invoke(cli, ["evaluate", str(users_table), "--bank", str(small_bank.path), "--shots", "5",
                                       "--trials", "1", "--steps", "2", "--device", "cpu", "--json"])
    assert json.loads(printed.stdout)["runs"] == data["runs"]  # --json prints what --out writes
    assert (tmp_path / "p.png").stat().st_size > 1000
    r = CliRunner().invoke(cli, ["evaluate", str(users_table), "--bank", str(small_bank.path), "--shots", "x"])
    assert r.exit_code == 2 and "comma-separated" in r.output
    some = CliRunner().invoke(cli, ["evaluate", str(users_table), "--bank", str(small_bank.path), "--shots", "5",
                                    "--trials", "1", "--steps", "2", "--device", "cpu", "--json",
                                    "--methods", "the paper's recipe; the default"])
    assert some.exit_code == 0, some.output
    assert sorted(json.loads(some.stdout)["methods"]) == ["the default", "the paper's recipe"]
    bad = CliRunner().invoke(cli, ["evaluate", str(users_table), "--bank", str(small_bank.path), "--methods", "paper"])
    assert bad.exit_code != 0 and "unknown method(s) 'paper'; choose from" in bad.output and "'MSE loss'" in bad.output
    with pytest.raises(LaionfilterError, match="unknown method"):
        methods_named(LearnConfig(), ["nope"])


def test_srocc_handles_constant_inputs():
    assert srocc([1, 2, 3], [5, 5, 5]) == 0.0
    assert srocc([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)


def test_a_pairs_file_is_evaluated_over_pairs_with_agreement(ratings_csv, small_bank, tmp_path):
    from laionfilter.objective import pair_agreement

    shutil.copytree(ratings_csv.parent / "img", tmp_path / "img")
    rated = [line.split(",") for line in ratings_csv.read_text().splitlines()[1:]]
    lines = ["image_a,image_b,winner"]
    for (a, sa), (b, sb) in zip(rated, rated[1:] + rated[:1]):
        lines.append(f"{a},{b},{'a' if float(sa) > float(sb) else 'b' if float(sa) < float(sb) else 'tie'}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    methods = {ZERO_SHOT: ZERO_SHOT, "learned": LearnConfig(steps=2, device="cpu")}
    r = evaluate(tmp_path / "pairs.csv", small_bank, shots=(5,), trials=1, methods=methods, progress=False)
    import numpy as np
    import torch

    from laionfilter.merger import Merger
    from laionfilter.model import eval_transform
    from laionfilter.ratings import read_ratings

    sup = read_ratings(tmp_path / "pairs.csv", eval_transform(small_bank.architecture)).supports[0]
    test = np.sort(np.random.default_rng([0, 0, 5, 0]).permutation(len(sup.pairs))[5:])
    preds = Merger(small_bank, torch.device("cpu")).task_predictions(sup.pixels)
    zero = next(x["srocc"] for x in r["runs"] if x["method"] == ZERO_SHOT)
    assert zero == pytest.approx(pair_agreement(sup.pairs[test], preds.mean(0)), abs=1e-9)
    assert {x["method"] for x in r["runs"]} == set(methods)


def test_a_planned_job_moves_progress_by_its_plan_whatever_it_reports():
    from laionfilter.evaluate import PlannedJob

    told = []
    job = PlannedJob(10, lambda name, on_step: on_step(3) or [name], ("split",))  # a fit that stopped early
    assert job(on_step=told.append) == ["split"] and told == [3, 7]
    assert job() == ["split"]  # and without a bar
