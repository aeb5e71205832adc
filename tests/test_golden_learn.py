"""The paper's recipe, pinned: the coefficients that a fixed support set gives must not move when the
learning code is reorganised (issue 32 split learn.py into stages after these were written).

Input: the shipped starter bank and the bundled example ratings (36 images, scores 1–5). Three fits of
the paper's recipe (adaptive start, Bradley–Terry loss, Adam on a cosine schedule, no anchor, no early
stopping): on all 36 ratings with batches of 8 (the random batch order is part of what is pinned), on
10 of them (every step sees the whole support set), and on pairwise answers made from the ratings. The
expected α (tests/data/golden-learn.json) was written by ``python -m tests.test_golden_learn`` on the
code before the split. Compared to 1e-5: float32 products round differently by CPU and thread count,
while a change to the recipe moves α by far more.
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from laionfilter.bank import resolve_bank
from laionfilter.devices import torch_threads
from laionfilter.model import eval_transform
from laionfilter.ratings import read_ratings
from laionfilter.recipe import LearnConfig

GOLDEN = Path(__file__).parent / "data" / "golden-learn.json"
RATINGS = Path(__file__).parent.parent / "laionfilter" / "data" / "example" / "ratings.csv"
PAPER = LearnConfig(init="adaptive", calibration="none", steps=40, batch_size=8, device="cpu", fit="backprop")


def golden_fits() -> dict[str, list]:
    from laionfilter.learn import fit
    from laionfilter.merger import Merger
    from laionfilter.objective import Paired, Scored

    bank = resolve_bank("starter")
    sup = read_ratings(RATINGS, eval_transform(bank.architecture)).supports[0]
    merger = Merger(bank, torch.device("cpu"))
    order = np.argsort(sup.scores, kind="stable")
    pairs = np.stack([order[1:][::2], order[:-1][::2]], axis=1)  # each image preferred to the one below it
    pairs = pairs[sup.scores[pairs[:, 0]] > sup.scores[pairs[:, 1]]]
    with torch_threads(1):
        return {
            "36 ratings, batch 8": fit(merger, Scored(sup.pixels, sup.scores), PAPER).alpha.tolist(),
            "10 ratings": fit(merger, Scored(sup.pixels[:10], sup.scores[:10]), replace(PAPER, batch_size=32)).alpha.tolist(),
            "pairs": fit(merger, Paired(sup.pixels, pairs), PAPER).alpha.tolist(),
        }


def test_the_papers_recipe_gives_the_pinned_coefficients():
    want = json.loads(GOLDEN.read_text())
    got = golden_fits()
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(np.array(got[name]), np.array(want[name]), rtol=0, atol=1e-5, err_msg=name)


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(golden_fits()) + "\n")
