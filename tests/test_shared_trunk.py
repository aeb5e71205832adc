"""Profiles that share their first layers (learn --tune) share one trunk when scored, with the same rows."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from laionfilter.start import tuned_layers
from laionfilter.recipe import LearnConfig
from laionfilter.model import layer_stage
from laionfilter.profile import learn_profiles
from laionfilter.score import ScoreConfig, score_shards
from laionfilter.scorer import MergedModels, group_by_prefix

from .helpers import good_samples, write_shard


@pytest.fixture(scope="module")
def tuned(small_bank, ratings_csv, tmp_path_factory):
    """Two head, two top-1 and one all profile, learned on the same ratings with different seeds."""
    root = tmp_path_factory.mktemp("tuned")
    out = {}
    for name, tune, seed in [("h1", "head", 1), ("h2", "head", 2), ("t1", "top-1", 1), ("t2", "top-1", 2),
                             ("a1", "all", 1)]:
        cfg = LearnConfig(steps=6, lr=5e-2, device="cpu", tune=tune, seed=seed, batch_size=8, calibration="none")
        out[name] = learn_profiles(ratings_csv, small_bank, root / f"{name}.profile", cfg, progress=False)[0]
    return out


def test_layers_not_tuned_keep_the_shared_value(tuned, small_bank):
    n = small_bank.n
    for name in ("h1", "t1"):
        p = tuned[name]
        mask = tuned_layers(small_bank.layers, p.meta["config"]["tune"])
        assert torch.equal(p.alpha[:, ~mask], torch.full_like(p.alpha[:, ~mask], 1.0 / n))
        start = torch.tensor(p.meta["init"]["alpha_per_task"])[:, None].expand_as(p.alpha[:, mask])
        assert not torch.allclose(p.alpha[:, mask], start)  # the tuned ones moved from their start
        assert p.meta["init"]["fixed_layers"] == int((~mask).sum()) and p.meta["init"]["tune"] == p.meta["config"]["tune"]
    stages = [layer_stage(l, 4) for l in small_bank.layers]
    head = tuned_layers(small_bank.layers, "head")
    assert [s for s, m in zip(stages, head.tolist()) if m] == [6, 6, 6, 6]
    top1 = tuned_layers(small_bank.layers, "top-1")
    assert sorted({s for s, m in zip(stages, top1.tolist()) if m}) == [4, 5, 6]


def test_profiles_are_grouped_by_their_shared_prefix(tuned, small_bank):
    alphas = [tuned[k].alpha for k in ("h1", "h2", "t1", "t2", "a1")]
    stages = torch.tensor([layer_stage(l, 4) for l in small_bank.layers])
    assert group_by_prefix(alphas, stages, 4) == [(6, [0, 1]), (4, [2, 3]), (0, [4])]


def test_grouped_rows_equal_each_profile_scored_alone(tuned, small_bank, tmp_path):
    write_shard(tmp_path / "s.tar", good_samples("s", 11, seed=21))
    cfg = ScoreConfig(workers=0, device="cpu", batch_size=4)
    together = score_shards(str(tmp_path / "s.tar"), [tuned[k].path for k in tuned], tmp_path / "all",
                            bank=small_bank, cfg=cfg, progress=False)
    assert together["scored"] == 11
    rows = pq.read_table(tmp_path / "all" / "s.parquet")
    for name, prof in tuned.items():
        score_shards(str(tmp_path / "s.tar"), [prof.path], tmp_path / name, bank=small_bank, cfg=cfg, progress=False)
        alone = pq.read_table(tmp_path / name / "s.parquet").column(name).to_numpy()
        np.testing.assert_allclose(rows.column(name).to_numpy(), alone, rtol=1e-5, atol=1e-5)


def test_many_head_profiles_match_their_merged_models(tuned, small_bank):
    torch.manual_seed(0)
    base = tuned["h1"]
    profiles = []
    for i in range(40):  # head coefficients that differ per profile, the trunk's shared
        alpha = base.alpha.clone()
        mask = tuned_layers(small_bank.layers, "head")
        alpha[:, mask] += 0.3 * torch.randn(alpha[:, mask].shape)
        profiles.append((f"p{i}", type(base)(alpha, base.meta)))
    models = MergedModels(profiles, small_bank, torch.device("cpu"), precision="fp32")
    assert [(s, len(m)) for s, m, _, _ in models.groups] == [(6, 40)]
    from laionfilter.mapper import Batch

    x = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)  # cropped pixels, as workers hand them over
    got = models.scores(Batch("u", [{}] * 5, list(range(5)), x))
    with torch.no_grad():
        for name, prof in profiles[::7]:
            want = prof.model(small_bank)(models.pre.normalise(x)).numpy()
            np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-5)


def test_grouped_heads_equal_alone_with_bf16_weights(tuned, small_bank):
    """With --precision bf16 (the default on a GPU and on a CPU with bf16 units) the towers run in bf16 and
    the score head in float32, in the grouped path and alone alike, so that their rows still agree to
    float tolerance."""
    from laionfilter.mapper import Batch

    profiles = [(k, tuned[k]) for k in ("h1", "h2")]
    x = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    batch = Batch("u", [{}] * 6, list(range(6)), x)
    cpu = torch.device("cpu")
    grouped = MergedModels(profiles, small_bank, cpu, precision="bf16")
    single = [MergedModels([p], small_bank, cpu, precision="bf16") for p in profiles]
    assert grouped.groups[0][2].visual.conv1.weight.dtype == torch.bfloat16
    together = grouped.scores(batch)
    for (name, _), models in zip(profiles, single):
        np.testing.assert_allclose(together[name], models.scores(batch)[name], rtol=1e-5, atol=1e-5)
    assert not np.allclose(together["h1"], together["h2"])  # the heads differ, so the check could fail
