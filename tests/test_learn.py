import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from laionfilter.cli import cli
from laionfilter.errors import LaionfilterError
from laionfilter.learn import Merger, anchor_penalty, bradley_terry_loss, fit, fold_fits, init_coefficients, mixes
from laionfilter.merge import merge_weights
from laionfilter.model import eval_transform, torch_threads
from laionfilter.profile import learn_profiles, load_profile
from laionfilter.recipe import LearnConfig
from laionfilter.metrics import srocc
from laionfilter.ratings import read_ratings


def test_merged_weights_are_eq2_exactly():
    pre = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[0.5]])}
    tau = {"a": torch.tensor([[0.25, 0.5], [-1.0, 2.0]], dtype=torch.float16), "b": torch.tensor([[[4.0]], [[-8.0]]])}
    alpha = torch.tensor([[0.5, 0.25], [0.125, -1.0]])  # α_i^l: rows are tasks, columns layers
    out = merge_weights(pre, tau, ["a", "b"], alpha)
    assert torch.equal(out["a"], torch.tensor([1.0 + 0.5 * 0.25 + 0.125 * -1.0, -2.0 + 0.5 * 0.5 + 0.125 * 2.0]))
    assert torch.equal(out["b"], torch.tensor([[0.5 + 0.25 * 4.0 + -1.0 * -8.0]]))
    agnostic = merge_weights(pre, tau, ["a", "b"], torch.tensor([1.0, 0.5]))
    assert torch.equal(agnostic["b"], torch.tensor([[0.5 + 4.0 - 4.0]]))
    with pytest.raises(LaionfilterError, match="shape"):
        merge_weights(pre, tau, ["a", "b"], torch.ones(3, 2))


def test_merged_weights_on_a_real_bank(small_bank):
    g = torch.Generator().manual_seed(0)
    alpha = torch.rand(small_bank.n, len(small_bank.layers), generator=g)
    merged = small_bank.merged_state(alpha)
    differentiable = merge_weights(small_bank.pre, small_bank.tau, small_bank.layers, alpha.clone().requires_grad_())
    assert all(torch.equal(merged[k], differentiable[k].detach()) for k in merged)  # scoring's buffers: same bits
    for l, name in enumerate(small_bank.layers):
        expect = small_bank.pre[name].double() + sum(alpha[i, l].double() * small_bank.tau[name][i].double()
                                                     for i in range(small_bank.n))
        torch.testing.assert_close(merged[name].double(), expect, rtol=1e-6, atol=1e-7)


def test_initialisation_is_eq6_and_tends_to_uniform_and_best_fit():
    s = [0.1, 0.5, -0.2, 0.45]
    for T in (1.0, 0.3):
        a = init_coefficients(s, 7, "adaptive", T)
        expect = torch.tensor([math.exp(x / T) for x in s]) / sum(math.exp(x / T) for x in s)
        assert a.shape == (4, 7)
        for l in range(7):
            torch.testing.assert_close(a[:, l], expect.float())
    torch.testing.assert_close(init_coefficients(s, 3, "adaptive", 1e4), init_coefficients(s, 3, "uniform"), atol=1e-4, rtol=0)
    torch.testing.assert_close(init_coefficients(s, 3, "adaptive", 1e-3), init_coefficients(s, 3, "best-fit"), atol=1e-6, rtol=0)
    assert init_coefficients(s, 1, "best-fit")[:, 0].tolist() == [0, 1, 0, 0]
    assert init_coefficients(s, 1, "uniform")[:, 0].tolist() == [0.25] * 4


def test_bradley_terry_loss_by_hand():
    pred = torch.tensor([2.0, 1.0, 0.5])
    y = torch.tensor([3.0, 1.0, 1.0])  # pairs (0,1) and (0,2); the tie (1,2) is skipped
    expect = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-1.5))) / 2
    assert bradley_terry_loss(pred, y).item() == pytest.approx(expect)
    assert bradley_terry_loss(pred, torch.tensor([1.0, 1.0, 1.0])) is None
    # −log(e^ŷ1 / (e^ŷ1 + e^ŷ2)) form of eq. 3
    assert bradley_terry_loss(torch.tensor([0.3, 0.9]), torch.tensor([2.0, 1.0])).item() == pytest.approx(
        -math.log(math.exp(0.3) / (math.exp(0.3) + math.exp(0.9))))


def test_gradients_reach_only_the_coefficients(small_bank):
    merger = Merger(small_bank, torch.device("cpu"))
    alpha = torch.nn.Parameter(torch.full((small_bank.n, len(small_bank.layers)), 1 / 3))
    x = torch.randn(6, 3, 64, 64)
    pred = merger.forward(merger.state(alpha), x)
    bradley_terry_loss(pred, torch.arange(6.0)).backward()
    assert alpha.grad is not None and alpha.grad.abs().sum() > 0
    assert alpha.grad[:, -1].abs().sum() > 0  # the last head layer gets its own gradient
    assert all(p.grad is None and not p.requires_grad for p in merger.model.parameters())
    assert all(not t.requires_grad for t in list(merger.pre.values()) + list(merger.tau.values()))
    assert not merger.model.training  # eval mode: dropout off


def test_same_seed_same_profile_and_learning_helps(small_bank, ratings_csv, tmp_path):
    cfg = LearnConfig(steps=20, device="cpu", calibration="none")  # calibration: tests/test_calibrate.py
    a = learn_profiles(ratings_csv, small_bank, tmp_path / "a.profile", cfg, progress=False)[0]
    b = learn_profiles(ratings_csv, small_bank, tmp_path / "b.profile", cfg, progress=False)[0]
    assert torch.equal(a.alpha, b.alpha)
    c = learn_profiles(ratings_csv, small_bank, tmp_path / "c.profile", LearnConfig(steps=20, device="cpu", seed=1, calibration="none"),
                       progress=False)[0]
    assert torch.equal(load_profile(c.path).alpha, c.alpha) and load_profile(c.path).meta == c.meta
    assert not torch.equal(a.alpha, c.alpha)
    m = a.meta
    assert m["bank"]["fingerprint"] == small_bank.fingerprint and m["layers"] == 60 and len(m["tasks"]) == 3
    sup = read_ratings(ratings_csv, eval_transform(small_bank.architecture)).supports[0]
    merger = Merger(small_bank, torch.device("cpu"))
    assert m["support_srocc_after"] == pytest.approx(srocc(sup.scores, merger.predict(a.alpha, sup.pixels)), abs=1e-6)
    curve = m["loss_curve"]["values"]
    assert np.mean(curve[-3:]) < np.mean(curve[:3])  # the rank loss goes down on the support set
    assert m["ratings"]["images"] == 24 and len(m["ratings"]["sha256"]) == 64


def test_layer_agnostic_keeps_one_coefficient_per_task(small_bank, ratings_csv):
    sup = read_ratings(ratings_csv, eval_transform(small_bank.architecture)).supports[0]
    r = fit(Merger(small_bank, torch.device("cpu")), sup.pixels, sup.scores, LearnConfig(steps=5, layer_agnostic=True))
    assert r["alpha"].shape == (3, 60)
    assert torch.equal(r["alpha"], r["alpha"][:, :1].expand(3, 60))


def test_profile_model_is_the_merged_module_and_refuses_another_bank(small_bank, ratings_csv, tmp_path, tasks):
    from laionfilter.bank import build_bank

    p = learn_profiles(ratings_csv, small_bank, tmp_path / "p.profile", LearnConfig(steps=3), progress=False)[0]
    model = p.model(small_bank)
    assert isinstance(model, torch.nn.Module) and not model.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        direct = Merger(small_bank, torch.device("cpu")).predict(p.alpha, x)
        np.testing.assert_allclose(model(x).numpy(), direct, rtol=1e-5, atol=1e-5)
    other = build_bank(tasks[:2], tmp_path / "other")
    with pytest.raises(LaionfilterError, match="was learned on bank"):
        p.model(other)


def _write(tmp_path, text, name="r.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _problems(path, bank):
    with pytest.raises(LaionfilterError) as e:
        read_ratings(path, eval_transform(bank.architecture))
    return str(e.value)


def test_missing_column(tmp_path, small_bank):
    assert "missing column(s) 'score'" in _problems(_write(tmp_path, "image,rating\na.png,3\n"), small_bank)


def test_every_bad_row_is_named_at_once(tmp_path, small_bank, ratings_csv):
    import shutil

    shutil.copytree(ratings_csv.parent / "img", tmp_path / "img")
    (tmp_path / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    msg = _problems(_write(tmp_path, "image,score\nimg/00.png,5\nimg/01.png,abc\nimg/02.png,nan\n"
                                     "img/nope.png,4\nimg/broken.jpg,3\nimg/03.png,\n"), small_bank)
    assert "row 3: score 'abc' is not a number" in msg
    assert "row 4: score" in msg and "nan" in msg.lower()
    assert "row 5: image 'img/nope.png' not found" in msg
    assert "row 6: image 'img/broken.jpg' is unreadable" in msg
    assert "row 7: score" in msg
    assert "nothing was learned" in msg


def test_user_without_two_distinct_scores(tmp_path, small_bank, ratings_csv):
    import shutil

    shutil.copytree(ratings_csv.parent / "img", tmp_path / "img")
    msg = _problems(_write(tmp_path, "user,image,score\nann,img/00.png,5\nann,img/01.png,3\n"
                                     "bob,img/02.png,4\nbob,img/03.png,4\n"), small_bank)
    assert "user 'bob' (rows 4, 5): fewer than two distinct" in msg and "'ann'" not in msg


def test_duplicates_are_merged_by_mean_with_a_warning(tmp_path, small_bank, ratings_csv, capsys):
    import shutil

    shutil.copytree(ratings_csv.parent / "img", tmp_path / "img")
    path = _write(tmp_path, "image,score\nimg/00.png,2\nimg/01.png,5\nimg/00.png,4\n")
    sup = read_ratings(path, eval_transform(small_bank.architecture)).supports[0]
    assert len(sup.images) == 2 and sorted(sup.scores.tolist()) == [3.0, 5.0]
    assert "rows 2, 4 rate the same image" in capsys.readouterr().err


def test_cli_learn_per_user_and_inspect(tmp_path, small_bank, ratings_csv):
    import shutil

    shutil.copytree(ratings_csv.parent / "img", tmp_path / "img")
    lines = ratings_csv.read_text().splitlines()[1:]
    body = [f"{'ann' if i % 2 else 'bob.k'},{line.split(',')[0]},{line.split(',')[1] if i % 2 else 10 - int(line.split(',')[1])}"
            for i, line in enumerate(lines)]
    ratings = _write(tmp_path, "user,image,score\n" + "\n".join(body) + "\n", "users.tsv".replace("tsv", "csv"))
    runner = CliRunner()
    r = runner.invoke(cli, ["learn", str(ratings), "--bank", str(small_bank.path), "--out", str(tmp_path / "profiles"),
                            "--steps", "5", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "profiles").iterdir()) == ["ann.profile", "bob.k.profile"]
    r = runner.invoke(cli, ["inspect", str(tmp_path / "profiles" / "ann.profile"), "--plot", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    for t in ("sharpness", "noise", "colourfulness", "zero-shot SROCC", "support-set SROCC"):
        assert t in r.output
    assert (tmp_path / "a.png").stat().st_size > 1000
    import json

    info = json.loads(runner.invoke(cli, ["inspect", str(tmp_path / "profiles" / "ann.profile"), "--json"]).output)
    assert len(info["tasks"]) == 3 and info["name"] == "ann"
    assert info["config"]["init"] == "mixes" and info["start_scale"] > 1
    assert f"init mixes (T=0.1, scale {info['start_scale']:.3g})" in r.output
    # --temperature is the temperature of whichever start is chosen
    for init, field in (("mixes", "mix_temperature"), ("adaptive", "temperature")):
        r = runner.invoke(cli, ["learn", str(ratings), "--bank", str(small_bank.path), "--out", str(tmp_path / init),
                                "--steps", "0", "--device", "cpu", "--calibration", "none", "--init", init,
                                "--temperature", "0.25"])
        assert r.exit_code == 0, r.output
        config = json.loads(runner.invoke(cli, ["inspect", str(tmp_path / init / "ann.profile"), "--json"]).output)["config"]
        assert config[field] == 0.25 and config["init"] == init
    # a loss that must fall by 10 to count never does: the first step sets the best, 25 more stop the fit
    r = runner.invoke(cli, ["learn", str(ratings), "--bank", str(small_bank.path), "--out", str(tmp_path / "tol"),
                            "--steps", "100", "--tol", "10", "--device", "cpu", "--calibration", "none"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["inspect", str(tmp_path / "tol" / "ann.profile")])
    assert "100 steps (the loss settled at step 26)" in r.output, r.output


def test_recorded_start_is_the_initialisation_and_the_anchor_holds_alpha_near_it(small_bank, ratings_csv):
    sup = read_ratings(ratings_csv, eval_transform(small_bank.architecture)).supports[0]
    merger = Merger(small_bank, torch.device("cpu"))
    free = fit(merger, sup.pixels, sup.scores, LearnConfig(init="adaptive", steps=15, lr=5e-2, seed=3, anchor=0.0))
    expect = init_coefficients(free["zero_shot_srocc"], 60)
    assert torch.equal(free["alpha_init"], expect)  # not moved along by the optimizer
    assert not torch.equal(free["alpha"], expect)
    held = fit(merger, sup.pixels, sup.scores, LearnConfig(init="adaptive", steps=15, lr=5e-2, seed=3, anchor=100.0))
    moved = lambda r: (r["alpha"] - r["alpha_init"]).abs().mean().item()
    assert moved(held) < 0.5 * moved(free)


def test_the_mixes_start_is_scaled_while_the_anchor_holds_it(small_bank, ratings_csv):
    cfg = LearnConfig(mix_scale=1.5)
    sizes = [4, 10, 20, 25, 30, 50, 100, 1000]
    scales = [cfg.start_scale(n) for n in sizes]
    held = [n for n in sizes if cfg.anchor_weight(n) >= 1]
    assert held and all(cfg.start_scale(n) == 1.5 for n in held)  # the anchor holds α: the whole scale
    assert all(a >= b for a, b in zip(scales, scales[1:])) and 1 < scales[-3] < 1.5 and scales[-1] < 1.0001
    assert LearnConfig(init="adaptive", mix_scale=1.5).start_scale(10) == 1  # the paper's start is never scaled
    assert LearnConfig(anchor=0, mix_scale=1.5).start_scale(10) == 1  # nothing holds α at its start
    sup = read_ratings(ratings_csv, eval_transform(small_bank.architecture)).supports[0]
    merger = Merger(small_bank, torch.device("cpu"))
    preds = merger.mix_predictions(sup.pixels)
    plain = fit(merger, sup.pixels, sup.scores, LearnConfig(steps=0, mix_scale=1.0), mix_preds=preds)
    scaled = fit(merger, sup.pixels, sup.scores, LearnConfig(steps=0), mix_preds=preds)
    assert plain["start_scale"] == 1 and scaled["start_scale"] == LearnConfig().start_scale(len(sup.pixels)) > 1
    torch.testing.assert_close(scaled["alpha_init"], scaled["start_scale"] * plain["alpha_init"])


def test_anchor_penalty_is_anchor_over_support_size_to_its_power_times_the_summed_layer_mean():
    start = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    alpha = torch.tensor([[0.5, 1.5, 0.5], [0.5, 0.5, -0.5]])  # one layer of each task moved by 1
    # Σ_i mean_l: task 0 → 1/3, task 1 → 1/3; times (anchor / N)^power: 1 at N = anchor, 10^-power at 10×.
    assert anchor_penalty(alpha, start, 20.0, 20, 1.5).item() == pytest.approx(2 / 3)
    assert anchor_penalty(alpha, start, 10.0, 40, 1.5).item() == pytest.approx(0.125 * 2 / 3)
    assert anchor_penalty(alpha, start, 10.0, 100, 1.5).item() == pytest.approx(0.1 ** 1.5 * 2 / 3)
    assert anchor_penalty(alpha, start, 10.0, 100, power=3).item() == pytest.approx(1e-3 * 2 / 3)
    agnostic = anchor_penalty(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), 10.0, 10, 1.5)
    assert agnostic.item() == pytest.approx(0.5)


def test_the_default_recipe_is_anchored_and_anchor_zero_is_the_papers(small_bank, ratings_csv):
    sup = read_ratings(ratings_csv, eval_transform(small_bank.architecture)).supports[0]
    merger = Merger(small_bank, torch.device("cpu"))
    moved = lambda r: (r["alpha"] - r["alpha_init"]).abs().mean().item()
    paper = fit(merger, sup.pixels, sup.scores, LearnConfig(init="adaptive", steps=15, lr=5e-2, seed=3, anchor=0.0))
    default = fit(merger, sup.pixels, sup.scores, LearnConfig(steps=15, lr=5e-2, seed=3))
    assert moved(default) < moved(paper)


def test_mixes_are_each_task_each_pair_averaged_and_each_task_less_half_another():
    c = mixes(3)
    assert c.shape == (3 + 3 + 6, 3)
    assert np.array_equal(c[:3], np.eye(3))
    assert sorted(map(tuple, c[3:6])) == [(0, 0.5, 0.5), (0.5, 0, 0.5), (0.5, 0.5, 0)]
    assert sorted(map(tuple, c[6:])) == sorted((a, b, d) for a, b, d in
                                               [(1, -0.5, 0), (1, 0, -0.5), (-0.5, 1, 0), (0, 1, -0.5), (-0.5, 0, 1), (0, -0.5, 1)])
    assert len(set(map(tuple, c))) == len(c)


def test_mixes_initialisation_is_the_softmax_weighted_mean_of_the_candidates():
    s = [0.1, 0.5, -0.2]
    m = mixes(3)
    ms = np.linspace(-0.3, 0.4, len(m))
    for T in (1.0, 0.1):
        w = np.exp(ms / T) / np.exp(ms / T).sum()
        a = init_coefficients(s, 4, "mixes", T, list(ms))
        assert a.shape == (3, 4)
        for l in range(4):
            torch.testing.assert_close(a[:, l], torch.tensor(w @ m, dtype=torch.float32))
    sharp = init_coefficients(s, 2, "mixes", 1e-4, list(ms))  # T → 0: the best candidate alone
    torch.testing.assert_close(sharp[:, 0], torch.tensor(m[-1], dtype=torch.float32))
    scaled = init_coefficients(s, 2, "mixes", 1e-4, list(ms), mix_scale=1.25)
    torch.testing.assert_close(scaled[:, 0], torch.tensor(1.25 * m[-1], dtype=torch.float32))
    torch.testing.assert_close(init_coefficients(s, 2, "adaptive", 1.0, mix_scale=1.25),
                               init_coefficients(s, 2, "adaptive", 1.0))  # the paper's start is not scaled
    with pytest.raises(LaionfilterError, match="candidate"):
        init_coefficients(s, 2, "mixes", 0.1)


def test_mixes_init_scores_every_candidate_merge_on_the_support(small_bank, ratings_csv):
    sup = read_ratings(ratings_csv, eval_transform(small_bank.architecture)).supports[0]
    merger = Merger(small_bank, torch.device("cpu"))
    preds = merger.mix_predictions(sup.pixels)
    np.testing.assert_array_equal(preds[:small_bank.n], merger.task_predictions(sup.pixels))
    c = mixes(small_bank.n)[7]
    np.testing.assert_allclose(preds[7], merger.predict(torch.tensor(c, dtype=torch.float32), sup.pixels), rtol=1e-6)
    cfg = LearnConfig(init="mixes", steps=0, calibration="none")
    r = fit(merger, sup.pixels, sup.scores, cfg)
    assert r["mix_srocc"] == pytest.approx([srocc(sup.scores, p) for p in preds])
    expect = init_coefficients(r["zero_shot_srocc"], len(small_bank.layers), "mixes", cfg.mix_temperature, r["mix_srocc"],
                               cfg.start_scale(len(sup.pixels)))
    assert torch.equal(r["alpha_init"], expect)
    # the folds' starts come from the images each fold trains on, whether the candidates' predictions are
    # passed in (computed once for every fold) or computed per fold
    given = [f["alpha_init"] for _, f in fold_fits(merger, sup.pixels, sup.scores, cfg, mix_preds=preds)]
    own = [f["alpha_init"] for _, f in fold_fits(merger, sup.pixels, sup.scores, cfg)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(given, own))
    assert not torch.allclose(given[0], given[1])


def test_a_fit_that_stops_returns_the_best_alpha_it_measured():
    """Three ratings weigh the anchor 3,900 times: Adam circles above the start's loss and the fit stops
    after the patience; it must return the α of its lowest loss, not the last (a worse) one."""
    from laionfilter.bank import resolve_bank
    from laionfilter.demo import EXAMPLE

    bank = resolve_bank("starter")
    merger = Merger(bank, torch.device("cpu"))
    sup = read_ratings(EXAMPLE / "ratings.csv", eval_transform(bank.architecture)).supports[0]
    pixels, scores, cfg = sup.pixels[:3], sup.scores[:3], LearnConfig()
    r = fit(merger, pixels, scores, cfg)
    curve = r["loss_curve"]
    assert curve["last"] > curve["min"] and "converged_at" in curve  # it did circle, and stopped
    pred = merger.forward(merger.state(r["alpha"]), pixels).float()
    objective = bradley_terry_loss(pred, torch.as_tensor(scores, dtype=torch.float32)) + \
        anchor_penalty(r["alpha"], r["alpha_init"], cfg.anchor, len(scores), cfg.anchor_power)
    assert objective.item() == pytest.approx(curve["min"], abs=1e-6)


def test_a_fit_that_sees_the_whole_support_each_step_stops_once_its_loss_settles(small_bank, ratings_csv):
    sup = read_ratings(ratings_csv, eval_transform(small_bank.architecture)).supports[0]
    pixels, scores = sup.pixels[:12], sup.scores[:12]  # each step sees all 12 (batch 32)
    merger = Merger(small_bank, torch.device("cpu"))
    cfg = LearnConfig(steps=100, seed=3)
    told = []
    stopped = fit(merger, pixels, scores, cfg, on_step=told.append, checkpoints=(10, 100))
    at = stopped["loss_curve"]["converged_at"]
    assert 10 < at < 100 and stopped["loss_curve"]["steps"] == at
    assert sum(told) == 100  # the outer bar is told of the steps skipped too
    assert torch.equal(stopped["alpha_at"][100], stopped["alpha"])
    assert not torch.equal(stopped["alpha_at"][10], stopped["alpha"])
    full = fit(merger, pixels, scores, replace(cfg, tol=0.0))
    assert full["loss_curve"]["steps"] == 100 and "converged_at" not in full["loss_curve"]
    # where it stopped is most of the way to where every step would have taken it
    assert (stopped["alpha"] - full["alpha"]).abs().max() < 0.25 * (full["alpha"] - full["alpha_init"]).abs().max()
    minibatch = fit(merger, pixels, scores, replace(cfg, batch_size=4, steps=20, patience=2))
    assert minibatch["loss_curve"]["steps"] == 20  # a minibatch's loss is noisy: never a reason to stop


def test_a_fit_that_fails_in_its_process_stops_the_others_and_queues_nothing_more(tmp_path):
    import multiprocessing as mp
    import time

    from laionfilter.jobs import run_jobs

    def fails(on_step):
        on_step(1)
        raise LaionfilterError("fit 0 broke")

    def slow(i):
        def job(on_step):
            time.sleep(3)
            (tmp_path / f"{i}.done").touch()
            return {}
        return job

    with torch_threads(1), pytest.raises(LaionfilterError, match="fit 0 broke"):  # side by side, one thread each
        run_jobs([fails] + [slow(i) for i in range(1, 6)], processes=2)
    assert mp.active_children() == []  # the processes are gone, not finishing the fits still queued
    assert list(tmp_path.iterdir()) == []


def test_fits_go_side_by_side_by_default_only_for_small_models_on_one_thread(small_bank, monkeypatch):
    import laionfilter.jobs as jobs_module
    from laionfilter.jobs import fit_processes
    from laionfilter.model import usable_cores

    monkeypatch.delenv("LAIONFILTER_JOBS", raising=False)
    merger = Merger(small_bank, torch.device("cpu"))
    with torch_threads(1):
        assert fit_processes(merger) == usable_cores()
        assert fit_processes(merger, 3) == 3
        monkeypatch.setattr(jobs_module, "SMALL_MODEL_PARAMETERS", 0)  # the same bank, as if it were large
        assert fit_processes(merger) == 1  # a merged model per core would not be asked for unbidden
        assert fit_processes(merger, 2) == 2


def test_learn_into_a_folder_leaves_nothing_when_interrupted_and_refuses_a_file(tmp_path, small_bank, ratings_csv,
                                                                                 monkeypatch):
    import shutil

    import laionfilter.profile as profile_mod

    shutil.copytree(ratings_csv.parent / "img", tmp_path / "img")
    rows = ratings_csv.read_text().splitlines()[1:]
    ratings = _write(tmp_path, "user,image,score\n" + "\n".join(f"{'ab'[i % 2]},{r}" for i, r in enumerate(rows)) + "\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(profile_mod, "fit_recipe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        profile_mod.learn_profiles(ratings, small_bank, tmp_path / "profiles", progress=False)
    assert not (tmp_path / "profiles").exists()  # no empty folder left behind

    def never(*args, **kwargs):
        raise AssertionError("a fit ran before --out was checked")

    monkeypatch.setattr(profile_mod, "fit_recipe", never)
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(LaionfilterError, match="taken.*is a file"):
        profile_mod.learn_profiles(ratings, small_bank, tmp_path / "taken", progress=False)
    assert (tmp_path / "taken").read_text() == "mine"


def test_a_pairs_support_weighs_as_its_pairs_whatever_images_come_with_them(small_bank, ratings_csv):
    """The anchor's weight and the start's scale count the answers: K pairs weigh as K, whether the fit
    gets only the images they touch (learn) or all of a user's images (evaluate's K-pair splits)."""
    sup = read_ratings(ratings_csv, eval_transform(small_bank.architecture)).supports[0]
    top = np.argsort(-sup.scores)[:14]
    pairs = np.array([(a, b) for i, a in enumerate(top) for b in top[i + 1:] if sup.scores[a] > sup.scores[b]][:30])
    used = sorted(set(pairs.ravel().tolist()))
    assert len(pairs) == 30 and len(used) < 20 < len(sup.pixels)  # more answers than images, fewer than all
    remap = {old: new for new, old in enumerate(used)}
    own = np.vectorize(remap.get)(pairs)
    merger = Merger(small_bank, torch.device("cpu"))
    cfg = LearnConfig(steps=20, batch_size=32, tol=0, seed=3)
    alone = fit(merger, sup.pixels[used], None, cfg, pairs=own)  # learn: the pairs' own images
    among = fit(merger, torch.cat([sup.pixels[used], sup.pixels[[i for i in range(len(sup.pixels)) if i not in used]]]),
                None, cfg, pairs=own)  # evaluate: every image of the user
    for r in (alone, among):
        assert r["start_scale"] == cfg.start_scale(30) and r["anchor_weight"] == cfg.anchor_weight(30)
    assert cfg.start_scale(30) != cfg.start_scale(len(used)) and cfg.anchor_weight(30) != cfg.anchor_weight(len(sup.pixels))
    torch.testing.assert_close(alone["alpha"], among["alpha"])
