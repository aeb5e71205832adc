"""Choosing which images to rate: disagreement among the task models, spread out."""

import numpy as np
import pytest
from click.testing import CliRunner

from laionfilter.cli import cli
from laionfilter.suggest import rank_normalise, select_active

from .helpers import crops, jpeg


def test_the_most_disputed_image_comes_first_and_copies_do_not_follow_it():
    # 3 tasks × 6 images: image 2 is ranked top by one task and bottom by the others; image 5 is its copy.
    preds = np.array([[0.1, 0.2, 0.9, 0.3, 0.4, 0.9],
                      [0.1, 0.2, 0.0, 0.3, 0.4, 0.0],
                      [0.1, 0.2, 0.0, 0.3, 0.4, 0.0]])
    ranks = rank_normalise(preds)
    assert ranks.min() == 0 and ranks.max() == 1
    picks = select_active(preds, 3)
    copy = ({2, 5} - {picks[0]}).pop()
    assert picks[0] in (2, 5) and picks[1] != copy  # the most disputed first, then not its copy
    assert len(set(picks)) == 3
    after = select_active(preds, 3, rated=[2])
    assert 2 not in after and after[0] != 5  # rated images count as picked, and so does their copy
    assert set(select_active(preds, 10)) == set(range(6))  # asking for more gives each image once


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(crops(12, seed=41)):
        (folder / f"{i:02d}.jpg").write_bytes(jpeg(img))
    return folder


def test_suggest_writes_a_file_to_rate_and_skips_what_is_rated(photos, tmp_path, monkeypatch):
    r = CliRunner().invoke(cli, ["suggest", str(photos), "--n", "4", "--out", str(tmp_path / "next.csv")])
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "next.csv").read_text().splitlines()
    assert lines[0] == "image,score" and len(lines) == 5
    assert b"\r" not in (tmp_path / "next.csv").read_bytes()  # LF, as hand-written rating files have
    first = [line.split(",")[0] for line in lines[1:]]
    (tmp_path / "so-far.csv").write_text("image,score\n" + "".join(f"{f},5\n" for f in first))
    r = CliRunner().invoke(cli, ["suggest", str(photos), "--n", "4", "--ratings", str(tmp_path / "so-far.csv"),
                                 "--out", str(tmp_path / "next2.csv")])
    again = [line.split(",")[0] for line in (tmp_path / "next2.csv").read_text().splitlines()[1:]]
    assert r.exit_code == 0 and len(again) == 4 and not set(again) & set(first)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # printed, not written: named as the ratings name them, not from here
    r = CliRunner().invoke(cli, ["suggest", str(photos), "--n", "4", "--ratings", str(tmp_path / "so-far.csv")])
    assert r.exit_code == 0 and r.stdout.splitlines() == again


def test_rate_active_order_starts_with_the_suggested_images(photos, tmp_path):
    from laionfilter.bank import resolve_bank
    from laionfilter.rate import Session, collect_images
    from laionfilter.suggest import active_order, suggest

    items = collect_images(str(photos), out=tmp_path / "r.csv")
    order = active_order(items, resolve_bank("starter"))
    session = Session(tmp_path / "r.csv", items, order_hint=order)
    top = suggest(items, resolve_bank("starter"), 3, out=str(tmp_path / "n.csv"))
    assert [items[i].label for i in order[:3]] == top
    assert session.next_item()["item"] == order[0]


def test_evaluate_compares_random_and_active_on_the_same_test_images(users_table, small_bank, monkeypatch):
    import laionfilter.suggest
    from laionfilter.evaluate import SELECTIONS, evaluate_selection
    from laionfilter.recipe import LearnConfig

    real, fitted = laionfilter.suggest.fit_predictions, []
    monkeypatch.setattr(laionfilter.suggest, "fit_predictions", lambda *a: fitted.append(1) or real(*a))
    recipe = LearnConfig(steps=2, device="cpu")
    r = evaluate_selection(users_table, small_bank, shots=(8,), trials=1, recipe=recipe, selections=SELECTIONS,
                           progress=False, jobs=1)
    methods = {x["method"] for x in r["runs"]}
    assert methods == set(SELECTIONS) and len(r["runs"]) == 2 * 3  # 2 users × 3 selections
    assert len(fitted) == 2  # active+fit's second round, chosen by a fit of its first 4 ratings
    again = evaluate_selection(users_table, small_bank, shots=(8,), trials=1, recipe=recipe, selections=SELECTIONS,
                               progress=False, jobs=2)
    assert again["runs"] == r["runs"]  # seeded: the same pools, picks and test images, two units at a time
    # One user and trial alone gives the same runs (a benchmark may farm them out).
    import torch

    from laionfilter.evaluate import selection_runs
    from laionfilter.merger import Merger
    from laionfilter.model import eval_transform
    from laionfilter.ratings import read_ratings

    sup = read_ratings(users_table, eval_transform(small_bank.architecture)).supports[1]
    merger = Merger(small_bank, torch.device("cpu"))
    alone = selection_runs(merger, sup, 1, 0, 8, SELECTIONS, recipe, 0, merger.task_predictions(sup.pixels))
    assert alone == [x for x in r["runs"] if x["user"] == sup.user]
    with pytest.raises(Exception, match="unknown selection"):
        evaluate_selection(users_table, small_bank, selections=("best",))


def test_the_fits_that_choose_are_the_out_of_fold_fits(users_table, small_bank):
    import torch

    from laionfilter.learn import fold_fits
    from laionfilter.merger import Merger
    from laionfilter.objective import Scored
    from laionfilter.recipe import LearnConfig
    from laionfilter.model import eval_transform
    from laionfilter.ratings import read_ratings
    from laionfilter.suggest import fit_predictions

    sup = read_ratings(users_table, eval_transform(small_bank.architecture)).supports[0]
    merger = Merger(small_bank, torch.device("cpu"))
    cfg = LearnConfig(steps=3, device="cpu", folds=3)
    x, y = sup.pixels[:9], sup.scores[:9]
    preds = fit_predictions(merger, Scored(x, y), cfg, sup.pixels)
    assert preds.shape == (3, len(sup.scores))
    for f, (held, r) in enumerate(fold_fits(merger, Scored(x, y), cfg)):  # each fold's fit, on every image
        np.testing.assert_allclose(preds[f], merger.predict(r.alpha, sup.pixels), rtol=1e-5)
    assert not np.allclose(preds[0], preds[1])  # fits that left out different ratings differ


def test_suggest_by_fit_needs_four_ratings_and_names_bad_rows(photos, tmp_path):
    out = tmp_path / "next.csv"
    r = CliRunner().invoke(cli, ["suggest", str(photos), "--n", "5", "--out", str(out)])
    first = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    so_far = tmp_path / "so-far.csv"  # four rated, the fifth left blank: picked, but not a rating yet
    so_far.write_text("image,score\n" + "".join(f"{f},{s}\n" for f, s in zip(first, [1, 4, 2, 5, ""])))
    r = CliRunner().invoke(cli, ["suggest", str(photos), "--n", "4", "--ratings", str(so_far), "--out", str(out),
                                 "--steps", "5", "--by", "fit"])
    assert r.exit_code == 0, r.output
    assert "4 ratings; choosing where 4 fits of them disagree" in r.output
    again = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    assert len(again) == 4 and not set(again) & set(first)
    so_far.write_text("image,score\n" + "".join(f"{f},{s}\n" for f, s in zip(first, [1, 4, 2, 2, ""])))
    r = CliRunner().invoke(cli, ["suggest", str(photos), "--ratings", str(so_far), "--by", "fit", "--steps", "5",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output  # four scores, three different: enough
    so_far.write_text("image,score\n" + "".join(f"{f},{s}\n" for f, s in zip(first, [1, 4, 2, "", ""])))
    r = CliRunner().invoke(cli, ["suggest", str(photos), "--ratings", str(so_far), "--by", "fit", "--out", str(out)])
    assert r.exit_code != 0 and "at least 4 scores" in r.output and "has 3" in r.output
    so_far.write_text("image,score\n" + "".join(f"{f},{s}\n" for f, s in zip(first, [1, 4, "good", 5, ""])))
    r = CliRunner().invoke(cli, ["suggest", str(photos), "--ratings", str(so_far)])
    assert r.exit_code != 0 and "row 4: score 'good' is not a number" in r.output
    so_far.write_text("user,image,score\n" + "".join(f"{u},{f},3\n" for u, f in zip("abab", first)))
    r = CliRunner().invoke(cli, ["suggest", str(photos), "--ratings", str(so_far)])
    assert r.exit_code != 0 and "several users" in r.output
