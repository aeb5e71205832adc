import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from laionfilter.cli import cli
from laionfilter.errors import LaionfilterError
from laionfilter.learn import fit
from laionfilter.learn import fit_recipe, fit_recipes
from laionfilter.merger import Merger
from laionfilter.objective import Paired, Scored, bradley_terry_loss
from laionfilter.start import init_coefficients
from laionfilter.merge import merge_weights
from laionfilter.devices import torch_threads
from laionfilter.model import eval_transform
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
    assert all(p.is_meta for p in merger.model.parameters())  # a skeleton: the merged weights come with each call
    assert all(not t.requires_grad for t in list(merger.pre.values()) + list(merger.tau.values()))
    assert not merger.model.training  # eval mode: dropout off


def test_same_seed_same_profile_and_learning_helps(small_bank, ratings_csv, tmp_path):
    # batches of 8 of the 24 images: the seed draws them (calibration: tests/test_calibrate.py)
    cfg = LearnConfig(steps=20, device="cpu", calibration="none", batch_size=8)
    a = learn_profiles(ratings_csv, small_bank, tmp_path / "a.profile", cfg, progress=False)[0]
    b = learn_profiles(ratings_csv, small_bank, tmp_path / "b.profile", cfg, progress=False)[0]
    assert torch.equal(a.alpha, b.alpha)
    c = learn_profiles(ratings_csv, small_bank, tmp_path / "c.profile", replace(cfg, seed=1),
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
    for how in ("linear", "backprop"):
        r = fit(Merger(small_bank, torch.device("cpu")), Scored(sup.pixels, sup.scores),
                LearnConfig(steps=5, layer_agnostic=True, fit=how, refresh=2))
        assert r.alpha.shape == (3, 60)
        assert torch.equal(r.alpha, r.alpha[:, :1].expand(3, 60))
        assert not torch.equal(r.alpha, r.alpha_init)


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
    assert info["config"]["init"] == "adaptive" and info["config"]["fit"] == "linear" and info["config"]["drift"] == 0.05
    r = runner.invoke(cli, ["inspect", str(tmp_path / "profiles" / "ann.profile")])
    assert "init adaptive (T=1.0)" in r.output
    assert "(linear fit, refreshed every 100 and on an RMS move of 0.05)" in r.output
    steps = info["linearised_at"]  # the final fit's expansions: the first at the start, then as the drift rule says
    assert steps[0] == 0 and steps == sorted(set(steps))
    assert f"linearised {len(steps)} times" in r.output
    r = runner.invoke(cli, ["learn", str(ratings), "--bank", str(small_bank.path), "--out", str(tmp_path / "bp"),
                            "--steps", "3", "--device", "cpu", "--calibration", "none", "--temperature", "0.25",
                            "--fit", "backprop"])
    assert r.exit_code == 0, r.output
    config = json.loads(runner.invoke(cli, ["inspect", str(tmp_path / "bp" / "ann.profile"), "--json"]).output)["config"]
    assert config["temperature"] == 0.25 and config["fit"] == "backprop"
    assert "(backprop fit)" in runner.invoke(cli, ["inspect", str(tmp_path / "bp" / "ann.profile")]).output


def test_the_recorded_start_is_the_initialisation_and_stays_put(small_bank, ratings_csv):
    sup = read_ratings(ratings_csv, eval_transform(small_bank.architecture)).supports[0]
    merger = Merger(small_bank, torch.device("cpu"))
    for how in ("linear", "backprop"):
        r = fit(merger, Scored(sup.pixels, sup.scores), LearnConfig(steps=15, lr=5e-2, seed=3, fit=how, refresh=5))
        expect = init_coefficients(r.zero_shot_srocc, 60)
        assert torch.equal(r.alpha_init, expect)  # not moved along by the optimizer
        assert not torch.equal(r.alpha, expect)


def test_the_linear_fit_steps_on_expansions_made_every_refresh_steps(small_bank, ratings_csv):
    """Each expansion is the model's: its scores are the model's at its point, and the linear model
    agrees with the model near it; there is one per ``refresh`` steps, the first at the start."""
    sup = read_ratings(ratings_csv, eval_transform(small_bank.architecture)).supports[0]
    merger = Merger(small_bank, torch.device("cpu"))
    r = fit(merger, Scored(sup.pixels, sup.scores), LearnConfig(steps=10, refresh=4, lr=5e-2, fit="linear", drift=0.0))
    assert len(r.linearisations) == 3  # steps 0, 4 and 8
    assert torch.equal(r.linearisations[0].alpha, r.alpha_init)
    for lin in r.linearisations:
        np.testing.assert_allclose(lin.scores.numpy(), merger.predict(lin.alpha, sup.pixels), rtol=1e-5, atol=1e-5)
    lin = r.linearisations[-1]
    step = 1e-3 * torch.randn_like(lin.alpha)
    exact = merger.predict(lin.alpha + step, sup.pixels)
    np.testing.assert_allclose(lin(lin.alpha + step).numpy(), exact, atol=1e-4)
    moved = merger.predict(lin.alpha, sup.pixels)
    assert np.abs(exact - moved).max() > 10 * np.abs(lin(lin.alpha + step).numpy() - exact).max()  # it is not flat
    assert not torch.equal(r.linearisations[1].alpha, r.linearisations[2].alpha)


def test_many_support_sets_fitted_together_get_what_each_gets_alone(small_bank, ratings_csv):
    sup = read_ratings(ratings_csv, eval_transform(small_bank.architecture)).supports[0]
    merger = Merger(small_bank, torch.device("cpu"))
    rng = np.random.default_rng(0)
    picks = [np.sort(rng.choice(len(sup.scores), k, replace=False)) for k in (8, 12, 24)]  # one over a batch of 16
    supports = [Scored(sup.pixels[p], sup.scores[p]) for p in picks]
    order = np.argsort(sup.scores, kind="stable")
    pairs = np.stack([order[1:], order[:-1]], axis=1)[sup.scores[order[1:]] > sup.scores[order[:-1]]]
    supports.append(Paired(sup.pixels, pairs))
    cfg = LearnConfig(steps=12, refresh=5, batch_size=16, calibration="linear", folds=3, device="cpu", fit="linear")
    together = fit_recipes(merger, supports, cfg)
    for s, t in zip(supports, together):
        alone = fit_recipe(merger, s, cfg)
        torch.testing.assert_close(t.alpha, alone.alpha, atol=1e-5, rtol=0)
        if isinstance(s, Scored):
            assert t.calibration.slope == pytest.approx(alone.calibration.slope, abs=1e-4)
            np.testing.assert_allclose(t.oof, alone.oof, atol=1e-4)
        else:
            assert t.calibration is None  # pairwise answers have no scale
    assert not torch.equal(together[0].alpha, together[1].alpha)


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
    from laionfilter.devices import usable_cores

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
    monkeypatch.setattr(profile_mod, "run_jobs", interrupted)  # several users are fitted side by side
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


@pytest.mark.parametrize("how", ["linear", "backprop"])
def test_a_pairs_fit_depends_on_its_pairs_not_on_the_images_that_come_with_them(small_bank, ratings_csv, how):
    """learn hands a pairs fit the images its pairs touch; evaluate's K-pair splits hand it all of a
    user's images: the same pairs must learn the same α either way."""
    sup = read_ratings(ratings_csv, eval_transform(small_bank.architecture)).supports[0]
    top = np.argsort(-sup.scores)[:14]
    pairs = np.array([(a, b) for i, a in enumerate(top) for b in top[i + 1:] if sup.scores[a] > sup.scores[b]][:30])
    used = sorted(set(pairs.ravel().tolist()))
    assert len(pairs) == 30 and len(used) < 20 < len(sup.pixels)  # more answers than images, fewer than all
    remap = {old: new for new, old in enumerate(used)}
    own = np.vectorize(remap.get)(pairs)
    merger = Merger(small_bank, torch.device("cpu"))
    cfg = LearnConfig(steps=20, batch_size=16, seed=3, fit=how, refresh=7)
    alone = fit(merger, Paired(sup.pixels[used], own), cfg)  # learn: the pairs' own images
    rest = [i for i in range(len(sup.pixels)) if i not in used]
    among = fit(merger, Paired(torch.cat([sup.pixels[used], sup.pixels[rest]]), own), cfg)  # evaluate: every image
    torch.testing.assert_close(alone.alpha, among.alpha, atol=1e-5, rtol=1e-5)
    assert not torch.equal(alone.alpha, alone.alpha_init)


@pytest.mark.parametrize("tune", ["head", "top-1"])
def test_a_fit_of_the_top_runs_the_trunk_once_and_learns_what_the_whole_model_learns(small_bank, ratings_csv,
                                                                                     tune, monkeypatch):
    """With --tune head or top-N the layers below are the same for every step and user: their features
    are computed once per image, and the fit (both fits, the folds and the calibration) ends where the
    fit through the whole model does."""
    from laionfilter.model import ScoreModel

    sup = read_ratings(ratings_csv, eval_transform(small_bank.architecture)).supports[0]
    support = Scored(sup.pixels[:24], sup.scores[:24])
    merger = Merger(small_bank, torch.device("cpu"))
    stems = []
    embeds = ScoreModel.trunk
    monkeypatch.setattr(ScoreModel, "trunk", lambda self, x, split: stems.append(len(x)) or embeds(self, x, split))
    for how in ("backprop", "linear"):
        cfg = LearnConfig(steps=12, refresh=5, lr=5e-2, batch_size=8, folds=3, device="cpu", fit=how, tune=tune)
        stems.clear()
        cached = fit_recipe(merger, support, cfg)
        assert sum(stems) == len(support.pixels)  # every image through the trunk once, for 12 steps × 4 fits
        with monkeypatch.context() as m:
            m.setattr(ScoreModel, "splittable", lambda self: False)
            whole = fit_recipe(merger, support, cfg)
        torch.testing.assert_close(cached.alpha, whole.alpha, atol=2e-5, rtol=0)
        np.testing.assert_allclose(cached.oof, whole.oof, atol=1e-4)
        assert cached.support_srocc_after == pytest.approx(whole.support_srocc_after, abs=1e-6)
        assert not torch.equal(cached.alpha, cached.alpha_init)


def test_the_start_predicts_each_distinct_image_once_however_many_users_rated_it(small_bank, ratings_csv,
                                                                                 monkeypatch):
    from laionfilter.learn import shared_task_predictions

    sup = read_ratings(ratings_csv, eval_transform(small_bank.architecture)).supports[0]
    merger = Merger(small_bank, torch.device("cpu"))
    picks = [np.arange(0, 12), np.arange(6, 20), np.array([19, 3, 0, 11])]  # overlapping, in another order
    supports = [Scored(sup.pixels[p], sup.scores[p]) for p in picks]
    keys = [[sup.images[i] for i in p] for p in picks]
    seen = []
    predict = Merger.task_predictions
    monkeypatch.setattr(Merger, "task_predictions", lambda self, x: seen.append(len(x)) or predict(self, x))
    shared = shared_task_predictions(merger, supports, keys)
    assert seen == [20]  # images 0..19, once each
    for s, p in zip(supports, shared):
        np.testing.assert_allclose(p, predict(merger, s.pixels), rtol=0, atol=1e-5)


@pytest.mark.parametrize("how", ["linear", "backprop"])
def test_users_who_rated_the_same_images_share_the_start_and_the_trunk(small_bank, users_table, tmp_path, how,
                                                                       monkeypatch):
    """Two users over the same 24 images, --tune head: each image through the task models and the
    trunk once for both, and each profile what that user learns alone."""
    from laionfilter.model import ScoreModel

    trunk_rows, pred_rows = [], []
    trunk, predict = ScoreModel.trunk, Merger.task_predictions
    monkeypatch.setattr(ScoreModel, "trunk", lambda self, x, split: trunk_rows.append(len(x)) or trunk(self, x, split))
    monkeypatch.setattr(Merger, "task_predictions", lambda self, x: pred_rows.append(len(x)) or predict(self, x))
    cfg = LearnConfig(steps=8, refresh=4, lr=5e-2, batch_size=8, folds=3, device="cpu", fit=how, tune="head")
    profiles = learn_profiles(users_table, small_bank, tmp_path / "p", cfg, progress=False, jobs=1)
    assert sum(trunk_rows) == 24 and pred_rows == [24]
    supports = read_ratings(users_table, eval_transform(small_bank.architecture)).supports
    merger = Merger(small_bank, torch.device("cpu"))
    for sup, prof in zip(supports, profiles):
        alone = fit_recipe(merger, Scored(sup.pixels, sup.scores), cfg)
        torch.testing.assert_close(prof.alpha, alone.alpha, atol=2e-5, rtol=0)
    assert not torch.equal(profiles[0].alpha, profiles[1].alpha)


def test_the_linear_fit_linearises_again_once_alpha_has_drifted(small_bank, ratings_csv):
    """--drift: a new expansion as soon as the tuned coefficients have moved by that RMS, each support
    set on its own schedule when fitted side by side, and its folds replay the steps it was made at."""
    from laionfilter.linearised import _moved

    sup = read_ratings(ratings_csv, eval_transform(small_bank.architecture)).supports[0]
    merger = Merger(small_bank, torch.device("cpu"))
    support = Scored(sup.pixels, sup.scores)
    cfg = LearnConfig(steps=30, refresh=1000, lr=5e-2, fit="linear", device="cpu", calibration="none", drift=0.0)
    assert len(fit(merger, support, cfg).linearisations) == 1
    r = fit(merger, support, replace(cfg, drift=0.05))
    lins = r.linearisations
    assert len(lins) > 2 and [lin.step for lin in lins] == sorted({lin.step for lin in lins}) and lins[0].step == 0
    tuned = torch.ones(len(small_bank.layers), dtype=torch.bool)
    assert all(_moved(b.alpha, a.alpha, tuned) > 0.05 for a, b in zip(lins, lins[1:]))
    cfg = replace(cfg, drift=0.05, calibration="linear", folds=3, batch_size=8)
    supports = [Scored(sup.pixels[:12], sup.scores[:12]), support]
    together = fit_recipes(merger, supports, cfg)
    for s, t in zip(supports, together):
        alone = fit_recipe(merger, s, cfg)
        torch.testing.assert_close(t.alpha, alone.alpha, atol=1e-5, rtol=0)
        np.testing.assert_allclose(t.oof, alone.oof, atol=1e-4)
        assert [lin.step for lin in t.linearisations] == [lin.step for lin in alone.linearisations]
    assert [lin.step for lin in together[0].linearisations] != [lin.step for lin in together[1].linearisations]
