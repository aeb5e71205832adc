"""Scoring on a local Ray instance gives the local runner's output, retries killed tasks, and resumes."""

import functools
import os

import pyarrow.parquet as pq
import pytest

from laionfilter import distribute
from laionfilter.score import ScoreConfig, score_shards


ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _rows(out):
    return sorted(pq.read_table(sorted(out.glob("*.parquet"))).to_pylist(), key=lambda r: r["key"])


def test_ray_matches_local_retries_and_resumes(local_ray, shards, profiles, small_bank, tmp_path, monkeypatch):
    local = tmp_path / "local"
    score_shards(str(shards), profiles, local, bank=small_bank, cfg=ScoreConfig(workers=0, device="cpu", batch_size=4),
                 progress=False)
    fault = tmp_path / "die-once"
    fault.write_text("")

    def die_once():  # runs in the actor, after a batch: the first one to get here dies mid-shard
        try:
            fault.unlink()  # atomic: of two actors here at once, one removes it and the other does not
        except FileNotFoundError:
            return
        os._exit(1)

    monkeypatch.setattr(distribute, "run_ray", functools.partial(distribute.run_ray, after_batch=die_once))
    out = tmp_path / "ray"
    cfg = ScoreConfig(device="cpu", batch_size=4, distributor="ray", ray_actors=2)
    s = score_shards(str(shards), profiles, out, bank=small_bank, cfg=cfg, progress=False)
    assert not fault.exists()  # an actor died mid-shard once...
    assert (s["done"], s["failed"], s["samples"]) == (3, 0, 21)  # ...and its task was retried
    a, b = _rows(local), _rows(out)
    assert [r["key"] for r in b] == sorted({r["key"] for r in b}) and len(b) == 21
    assert [{k: v for k, v in r.items() if k not in ("alice", "bob")} for r in a] == \
           [{k: v for k, v in r.items() if k not in ("alice", "bob")} for r in b]
    for x, y in zip(a, b):
        assert x["alice"] == pytest.approx(y["alice"], abs=1e-6) and x["bob"] == pytest.approx(y["bob"], abs=1e-6)
    again = score_shards(str(shards), profiles, out, bank=small_bank, cfg=cfg, progress=False)
    assert (again["skipped"], again["done"]) == (3, 0)
