"""Scores in the user's own scale: the calibration map, the out-of-fold fits it is fitted on, and the
rating column from learn through score to select."""

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from laionfilter import learn as learn_module
from laionfilter.calibrate import Calibration, fit_calibration
from laionfilter.cli import cli
from laionfilter.errors import LaionfilterError
from laionfilter.evaluate import rating_errors
from laionfilter.jobs import learning_threads
from laionfilter.learn import fit
from laionfilter.learn import fit_recipe, fold_fits, oof_predictions
from laionfilter.merger import Merger
from laionfilter.metrics import srocc
from laionfilter.objective import Scored
from laionfilter.recipe import LearnConfig
from laionfilter.model import eval_transform
from laionfilter.profile import Profile, learn_profiles, load_profile
from laionfilter.ratings import read_ratings
from laionfilter.score import ScoreConfig, score_shards


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_linear_map_is_least_squares_with_a_non_negative_slope_clipped_to_the_range():
    x = np.array([0.0, 1.0, 2.0, 3.0])
    cal = fit_calibration(x, 2 * x + 1, "linear")
    assert (cal.slope, cal.intercept, cal.low, cal.high) == pytest.approx((2.0, 1.0, 1.0, 7.0))
    assert cal(np.array([-10.0, 1.5, 10.0])).tolist() == pytest.approx([1.0, 4.0, 7.0])
    against = fit_calibration(x, 7 - 2 * x, "linear")  # out-of-fold scores that rank backwards: no trust
    assert against.slope == 0 and against(np.array([-5.0, 5.0])).tolist() == pytest.approx([4.0, 4.0])
    flat = fit_calibration(np.zeros(4), np.array([1.0, 2.0, 3.0, 4.0]), "linear")
    assert flat(np.array([3.0])).tolist() == [2.5]


def test_isotonic_map_is_monotone_pools_equal_scores_and_is_flat_beyond_its_points():
    x = np.array([0.0, 1.0, 1.0, 2.0, 3.0])
    y = np.array([1.0, 4.0, 2.0, 2.0, 5.0])
    cal = fit_calibration(x, y, "isotonic")
    assert cal.x == (0.0, 1.0, 2.0, 3.0)
    assert cal.y == pytest.approx((1.0, 8 / 3, 8 / 3, 5.0))  # the violator (1 → 3, 2 → 2) pooled by weight
    assert cal(np.array([-1.0, 0.5, 9.0])).tolist() == pytest.approx([1.0, (1 + 8 / 3) / 2, 5.0])
    grid = cal(np.linspace(-1, 4, 50))
    assert np.all(np.diff(grid) >= 0)


def test_calibration_round_trips_and_a_malformed_one_is_refused_by_name():
    for kind in ("linear", "isotonic"):
        cal = fit_calibration(np.array([0.1, 0.4, 0.2, 0.9]), np.array([1.0, 3.0, 2.0, 5.0]), kind)
        again = Calibration.from_json(cal.to_json())
        assert again == cal
    with pytest.raises(LaionfilterError, match="p.profile: malformed calibration .*negative slope"):
        Calibration.from_json({"kind": "linear", "low": 1, "high": 5, "slope": -1, "intercept": 0}, "p.profile")
    with pytest.raises(LaionfilterError, match="increasing"):
        Calibration.from_json({"kind": "isotonic", "low": 1, "high": 5, "x": [0, 1], "y": [3, 2]})
    with pytest.raises(LaionfilterError, match="kind 'cubic'"):
        Calibration.from_json({"kind": "cubic", "low": 1, "high": 5})


def test_a_profile_with_a_malformed_calibration_is_refused_on_load(profiles, tmp_path):
    good = load_profile(profiles[0])
    meta = {**good.meta, "calibration": {"kind": "isotonic", "low": 1, "high": 5, "x": [0, 1], "y": [4, 2]}}
    bad = Profile(good.alpha, meta).save(tmp_path / "bad.profile")
    with pytest.raises(LaionfilterError, match=rf"{tmp_path / 'bad.profile'}: malformed calibration"):
        load_profile(bad)


@pytest.fixture(scope="module")
def support(small_bank, ratings_csv):
    sup = read_ratings(ratings_csv, eval_transform(small_bank.architecture)).supports[0]
    return Merger(small_bank, torch.device("cpu")), sup


@pytest.mark.parametrize("how", ["backprop", "linear"])
def test_each_image_is_scored_by_a_fit_that_never_saw_it(support, monkeypatch, how):
    merger, sup = support
    seen = []
    spied = "fit" if how == "backprop" else "fit_linear"
    real = getattr(learn_module, spied)

    def spy(merger, supports, cfg, *args, **kw):
        for s in supports if isinstance(supports, list) else [supports]:
            seen.append({tuple(p.flatten()[:8].tolist()) for p in s.pixels})
        return real(merger, supports, cfg, *args, **kw)

    cfg = LearnConfig(steps=2, device="cpu", folds=4, fit=how)
    final = fit(merger, Scored(sup.pixels, sup.scores), cfg) if how == "linear" else None
    monkeypatch.setattr(learn_module, spied, spy)
    folds = fold_fits(merger, Scored(sup.pixels, sup.scores), cfg, final=final)
    oof = oof_predictions(merger, sup.pixels, folds)
    assert len(seen) == 4
    images = [tuple(p.flatten()[:8].tolist()) for p in sup.pixels]
    held_out = [[im for im in images if im not in trained] for trained in seen]
    assert sorted(i for fold in held_out for i in fold) == sorted(images)  # every image held out exactly once
    for (held, r), fold in zip(folds, held_out):
        assert sorted(images[i] for i in held) == sorted(fold)
        np.testing.assert_allclose(oof[held], merger.predict(r.alpha, sup.pixels[held]), rtol=1e-6)
    # a fold's start is chosen on its own training images
    for held, r in folds:
        train = np.setdiff1d(np.arange(len(images)), held)
        own = fit(merger, Scored(sup.pixels[train], sup.scores[train]), replace(cfg, steps=0, fit="backprop"))
        assert torch.equal(r.alpha_init, own.alpha_init)


def test_fits_run_side_by_side_give_the_same_result_as_one_after_another(support):
    merger, sup = support
    cfg = LearnConfig(steps=4, device="cpu", folds=3, calibration="linear", fit="backprop")
    results, told = {}, {}
    with learning_threads(merger.bank, 1):  # side by side, each fit runs on one thread
        for processes in (1, 2):
            steps = []
            results[processes] = fit_recipe(merger, Scored(sup.pixels, sup.scores), cfg, on_step=steps.append,
                                            processes=processes)
            told[processes] = sum(steps)
    one, two = results[1], results[2]
    assert torch.equal(one.alpha, two.alpha)
    assert np.array_equal(one.oof, two.oof)
    assert one.calibration == two.calibration
    assert told[1] == told[2] == 3 * 4 + 4  # every fold's steps and the final fit's, reported


def test_jobs_must_be_positive_and_run_on_one_thread_each(ratings_csv, small_bank, tmp_path, monkeypatch):
    r = run("learn", ratings_csv, "--bank", small_bank.path, "--out", tmp_path / "p.profile", "--jobs", "0")
    assert r.exit_code != 0 and "--jobs must be ≥ 1, not 0" in r.output
    monkeypatch.setenv("LAIONFILTER_JOBS", "two")
    r = run("learn", ratings_csv, "--bank", small_bank.path, "--out", tmp_path / "p.profile")
    assert r.exit_code != 0 and "LAIONFILTER_JOBS='two': not a whole number" in r.output
    monkeypatch.setenv("LAIONFILTER_JOBS", "1")
    # a process forked after torch's threads ran would hang: refused, saying what to do instead
    r = run("learn", ratings_csv, "--bank", small_bank.path, "--out", tmp_path / "p.profile", "--jobs", "2",
            "--threads", "2")
    assert r.exit_code != 0 and "add --threads 1, or use --jobs 1" in r.output
    assert not (tmp_path / "p.profile").exists()


@pytest.mark.parametrize("how", ["backprop", "linear"])
def test_the_profile_records_the_out_of_fold_fits_and_their_calibration(support, ratings_csv, small_bank, tmp_path, how):
    merger, sup = support
    cfg = LearnConfig(steps=8, device="cpu", folds=3, calibration="linear", fit=how, refresh=3)
    r = fit_recipe(merger, Scored(sup.pixels, sup.scores), cfg)
    assert r.folds == 3 and r.oof_srocc == pytest.approx(srocc(sup.scores, r.oof))
    assert r.calibration == fit_calibration(r.oof, sup.scores, "linear")
    if how == "linear":
        assert len(r.linearisations) == 3  # steps 0, 3 and 6
    # learn runs on one thread here, the fit above on torch's default: equal up to float rounding
    profile = learn_profiles(ratings_csv, small_bank, tmp_path / "p.profile", cfg, progress=False)[0]
    meta = load_profile(profile.path).meta
    assert meta["out_of_fold"]["folds"] == 3
    assert meta["out_of_fold"]["srocc"] == pytest.approx(r.oof_srocc, abs=1e-5)
    cal = load_profile(profile.path).calibration
    assert (cal.kind, cal.low, cal.high) == ("linear", r.calibration.low, r.calibration.high)
    assert (cal.slope, cal.intercept) == pytest.approx((r.calibration.slope, r.calibration.intercept), rel=1e-4)


def test_rating_errors_against_hand_computed_baselines():
    oof = np.array([1.0, 2.0, 3.0, 4.0])
    y_sup = np.array([2.0, 4.0, 6.0, 8.0])
    pred = np.array([0.0, 2.5, 5.0])
    y_test = np.array([2.0, 5.0, 9.0])
    e = rating_errors(oof, y_sup, pred, y_test)
    assert e["linear"] == pytest.approx(np.mean(np.abs(np.clip(2 * pred, 2, 8) - y_test)))
    assert e["min-max"] == pytest.approx(np.mean(np.abs(np.array([2.0, 5.0, 8.0]) - y_test)))
    assert e["support mean"] == pytest.approx(np.mean(np.abs(5.0 - y_test)))
    assert set(e) == {"linear", "isotonic", "min-max", "support mean"}


def test_score_writes_the_rating_beside_the_score_and_select_keeps_min_rating(profiles, shards, small_bank, tmp_path):
    alice = load_profile(profiles[0])
    assert alice.calibration.kind == "linear"  # learned with the default recipe
    out = tmp_path / "scores"
    score_shards(str(shards), [f"alice={profiles[0]}"], out, bank=small_bank,
                 cfg=ScoreConfig(workers=0, device="cpu"), progress=False)
    t = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("*.parquet"))).sort_by("key")
    assert t.schema.field("alice_rating").type == "float"
    score, rating = np.array(t["alice"].to_pylist()), np.array(t["alice_rating"].to_pylist())
    np.testing.assert_allclose(rating, alice.calibration(score.astype(np.float32)), rtol=1e-6)
    order = np.argsort(score)
    assert np.all(np.diff(rating[order]) >= 0)
    assert rating.min() >= alice.calibration.low and rating.max() <= alice.calibration.high
    cut = float(np.median(rating))
    r = run("select", out, "--column", "alice", "--min-rating", cut, "--out", tmp_path / "s.parquet")
    assert r.exit_code == 0, r.output
    got = pq.read_table(tmp_path / "s.parquet").to_pylist()
    keep = sorted(k for k, v in zip(t["key"].to_pylist(), rating) if np.float32(v) >= np.float32(cut))
    assert sorted(g["key"] for g in got) == keep and all(g["rating"] >= cut for g in got)
    # a threshold past every rating selects nothing, and says how high the ratings go
    ok = np.array(t["status"].to_pylist()) == "ok"
    r = run("select", out, "--column", "alice", "--min-rating", alice.calibration.high + 1, "--out", tmp_path / "none.csv")
    assert r.exit_code == 0 and "0 images selected" in r.output, r.output
    assert f"the highest score is {score[ok].max():.4g}, the highest rating is {rating[ok].max():.4g}" in r.output


def test_min_rating_without_a_calibrated_profile_and_rating_column_collisions(profiles, ratings_csv, small_bank,
                                                                              shards, tmp_path):
    plain = learn_profiles(ratings_csv, small_bank, tmp_path / "plain.profile",
                           LearnConfig(steps=2, device="cpu", calibration="none"), progress=False)[0]
    assert plain.calibration is None and "calibration" not in load_profile(plain.path).meta
    out = tmp_path / "scores"
    score_shards(str(shards), [str(plain.path)], out, bank=small_bank, cfg=ScoreConfig(workers=0, device="cpu"),
                 progress=False)
    assert "plain_rating" not in pq.read_schema(next(out.glob("*.parquet"))).names
    r = run("select", out, "--column", "plain", "--min-rating", 3, "--out", tmp_path / "s.parquet")
    assert r.exit_code == 1 and "--min-rating needs the column 'plain_rating'" in r.output
    for first, second in ((profiles[0], plain.path), (plain.path, profiles[0])):  # calibrated or not
        with pytest.raises(LaionfilterError, match="score columns"):
            score_shards(str(shards), [f"x={first}", f"X_rating={second}"], tmp_path / "clash",
                         bank=small_bank, cfg=ScoreConfig(workers=0, device="cpu"), progress=False)
