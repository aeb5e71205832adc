import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from click.testing import CliRunner

from laionfilter.cli import cli
from laionfilter.score import ScoreConfig, score_shards

from .helpers import good_samples, write_shard


@pytest.fixture(scope="module")
def scored(tmp_path_factory, profiles, small_bank):
    """Shards (one sample corrupt) scored by two profiles: the folder and the shards."""
    root = tmp_path_factory.mktemp("curation")
    shards = root / "shards"
    shards.mkdir()
    for s in range(2):
        samples = good_samples(f"{s:05d}", 12, seed=20 + s)
        if s == 1:
            samples[3]["jpg"] = b"broken"
        write_shard(shards / f"{s:05d}.tar", samples)
    out = root / "scores.parquet"
    score_shards(str(shards), profiles, out, bank=small_bank, cfg=ScoreConfig(workers=0, device="cpu"), progress=False)
    return out, shards


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def duck(scores, sql, params=()):
    con = duckdb.connect()
    con.read_parquet(f"{scores}/*.parquet").create_view("scores")
    return con.execute(sql, list(params)).fetchall()


@pytest.mark.parametrize("options, where", [
    (["--top", "5"], "TRUE ORDER BY alice DESC, key LIMIT 5"),
    (["--min-score", "MID"], "alice >= MID ORDER BY alice DESC, key"),
    (["--percentile", "75"], "alice >= (SELECT quantile_cont(alice, 0.75) FROM scores WHERE status = 'ok') ORDER BY alice DESC, key"),
    (["--where", "key LIKE '00001%'"], "key LIKE '00001%' ORDER BY alice DESC, key"),
    (["--min-rating", "MIDR"], "alice_rating >= MIDR ORDER BY alice DESC, key"),
])
def test_select_options_equal_hand_written_duckdb(scored, tmp_path, options, where):
    scores, _ = scored
    mid, midr = duck(scores, "SELECT median(alice), median(alice_rating) FROM scores")[0]
    options = [o.replace("MIDR", repr(midr)).replace("MID", repr(mid)) for o in options]
    where = where.replace("MIDR", repr(midr)).replace("MID", repr(mid))
    r = run("select", scores, "--column", "alice", *options, "--out", tmp_path / "s.parquet")
    assert r.exit_code == 0, r.output
    got = pq.read_table(tmp_path / "s.parquet").to_pylist()
    expect = duck(scores, f"SELECT key, alice, alice_rating FROM scores WHERE status = 'ok' AND alice IS NOT NULL AND {where}")
    assert [(g["key"], pytest.approx(g["score"]), pytest.approx(g["rating"])) for g in got] == [
        (k, pytest.approx(v), pytest.approx(r)) for k, v, r in expect]
    assert len(got) > 0 and set(got[0]) == {"url", "caption", "key", "shard", "score", "rating"}


def test_all_statuses_keeps_scored_rows_of_any_status_for_the_filter_and_the_percentile(tmp_path):
    from laionfilter.writer import schema

    # A scores file from elsewhere may hold scored rows whose status is not 'ok' (here 'flagged').
    folder = tmp_path / "scores.parquet"
    folder.mkdir()
    rows = [{"key": f"{i:03d}", "shard": "s", "url": f"u{i}", "caption": "", "width": 1, "height": 1,
             "status": "ok" if i < 5 else "flagged", "error": None, "alice": float(i if i < 5 else i + 5)}
            for i in range(10)]  # ok rows score 0-4, flagged ones 10-14
    pq.write_table(pa.Table.from_pylist(rows, schema=schema(["alice"])), folder / "part.parquet")
    keys = {}
    for extra in ([], ["--all-statuses"]):
        r = run("select", folder, "--column", "alice", "--percentile", "50", *extra, "--out", tmp_path / "s.parquet")
        assert r.exit_code == 0, r.output
        keys[bool(extra)] = [x["key"] for x in pq.read_table(tmp_path / "s.parquet").to_pylist()]
    assert keys[False] == ["004", "003", "002"]  # the median of the ok rows' scores is 2 (of all ten's, 7)
    assert keys[True] == ["009", "008", "007", "006", "005"]  # the median of all ten is 7


def test_select_joins_laion_metadata(scored, tmp_path):
    scores, _ = scored
    keys = [k for (k,) in duck(scores, "SELECT key FROM scores ORDER BY key")]
    meta = pa.table({
        "URL": [f"https://example.com/{k}.jpg" for k in keys], "TEXT": [f"laion text {k}" for k in keys],
        "WIDTH": [256 + 64 * (i % 8) for i in range(len(keys))], "HEIGHT": [512] * len(keys),
        "similarity": [0.3] * len(keys), "hash": list(range(len(keys))),
        "punsafe": [0.05 if i % 3 else 0.5 for i in range(len(keys))], "pwatermark": [0.1] * len(keys),
        "AESTHETIC_SCORE": [5.0] * len(keys)})
    pq.write_table(meta, tmp_path / "laion.parquet")
    r = run("select", scores, "--column", "bob", "--join", tmp_path / "laion.parquet", "--on", "url",
            "--where", "punsafe < 0.1 AND WIDTH >= 512", "--out", tmp_path / "s.parquet")
    assert r.exit_code == 0, r.output
    got = pq.read_table(tmp_path / "s.parquet").to_pylist()
    con = duckdb.connect()
    con.read_parquet(f"{scores}/*.parquet").create_view("scores")
    con.read_parquet(str(tmp_path / "laion.parquet")).create_view("meta")
    expect = con.execute("SELECT s.key FROM scores s JOIN meta m ON s.url = m.URL WHERE s.status = 'ok' "
                         "AND m.punsafe < 0.1 AND m.WIDTH >= 512 ORDER BY s.bob DESC, s.key").fetchall()
    assert [g["key"] for g in got] == [k for (k,) in expect] and got
    assert all(g["punsafe"] < 0.1 and g["WIDTH"] >= 512 and g["TEXT"] == f"laion text {g['key']}" for g in got)


def test_query_prints_and_writes(scored, tmp_path):
    scores, _ = scored
    r = run("query", scores, "SELECT status, count(*) AS n FROM scores GROUP BY status ORDER BY status")
    assert r.exit_code == 0 and "unsupported  1" in r.output and "ok           23" in r.output
    r = run("query", scores, "SELECT key FROM scores WHERE status = 'ok'", "--out", tmp_path / "q.csv")
    assert r.exit_code == 0 and len((tmp_path / "q.csv").read_text().splitlines()) == 24  # 23 ok rows and the header


@pytest.mark.parametrize("args, message", [
    (["select", "SCORES", "--column", "alice", "--where", "alice >>> 3", "--out", "X"], "SQL error"),
    (["select", "SCORES", "--column", "carol", "--out", "X"], "no scores for profile 'carol'"),
    (["select", "MISSING", "--column", "alice", "--out", "X"], "no such scores folder"),
    (["query", "SCORES", "SELECT nope FROM scores"], "SQL error"),
])
def test_errors_are_one_line(scored, tmp_path, args, message):
    scores, _ = scored
    args = [a.replace("SCORES", str(scores)).replace("MISSING", str(tmp_path / "none")).replace("X", str(tmp_path / "x.parquet"))
            for a in args]
    r = run(*args)
    assert r.exit_code == 1 and message in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_reshard_copies_the_same_bytes(scored, tmp_path):
    scores, shards = scored
    r = run("select", scores, "--column", "alice", "--top", "7", "--out", tmp_path / "s.parquet")
    assert r.exit_code == 0
    r = run("reshard", tmp_path / "s.parquet", "--shards", shards, "--out", tmp_path / "new", "--per-shard", "4")
    assert r.exit_code == 0, r.output
    assert "7 samples copied, 0 not found" in r.output
    originals = {}
    for s in range(2):
        for x in wds.WebDataset(str(shards / f"{s:05d}.tar"), shardshuffle=False, empty_check=False):
            originals[x["__key__"]] = x
    copied = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "new").glob("*.tar")), shardshuffle=False,
                                 empty_check=False))
    assert len(copied) == 7 and len(list((tmp_path / "new").glob("*.tar"))) == 2
    for x in copied:
        o = originals[x["__key__"]]
        assert x["jpg"] == o["jpg"] and x["json"] == o["json"] and x["txt"] == o["txt"]
    # a sample missing from the shards is reported, and the exit status says so
    pq.write_table(pa.table({"key": ["nope"], "shard": ["00000"], "url": ["u"]}), tmp_path / "bad.parquet")
    r = run("reshard", tmp_path / "bad.parquet", "--shards", shards, "--out", tmp_path / "new2")
    assert r.exit_code == 1 and "1 not found" in r.output


def test_fetch_with_img2dataset_on_local_files(fetched):
    _, out, r = fetched
    assert r.exit_code == 0, r.output
    assert "6 of 6 images downloaded, 0 failed" in r.output
    got = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False, empty_check=False))
    assert sorted(x["txt"].decode() for x in got) == [f"cap {i}" for i in range(6)]


def test_guidance_pairs_respect_margin_and_groups(scored, tmp_path):
    scores, _ = scored
    r = run("guidance", scores, "--out", tmp_path / "g", "--top", "5", "--bottom", "4", "--pairs", "50",
            "--margin", "0.001", "--group-by", "shard")
    assert r.exit_code == 0, r.output
    for prof in ("alice", "bob"):
        folder = tmp_path / "g" / prof
        ex = pq.read_table(folder / "exemplars.parquet").to_pylist()
        neg = pq.read_table(folder / "negatives.parquet").to_pylist()
        pairs = pq.read_table(folder / "pairs.parquet").to_pylist()
        best = [s for (s,) in duck(scores, f"SELECT {prof} FROM scores WHERE status = 'ok' ORDER BY {prof} DESC LIMIT 5")]
        assert [e["score"] for e in ex] == pytest.approx(best) and len(neg) == 4
        assert pairs and len(pairs) <= 50
        shard_of = dict(duck(scores, "SELECT key, shard FROM scores"))
        for p in pairs:
            assert p["score_0"] - p["score_1"] >= 0.001 and p["label_0"] == 1
            assert shard_of[p["key_0"]] == shard_of[p["key_1"]] == p["group"]
            assert p["key_0"] != p["key_1"]
    # A margin no pair can reach gives no pairs, and says so in the counts.
    r = run("guidance", scores, "--column", "alice", "--out", tmp_path / "h", "--margin", "100")
    assert "0 pairs" in r.output


def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    import sys

    from laionfilter.demo import run_demo

    for extra in ("skimage", "sklearn"):  # what `pip install .` does not bring (the train extra's photos)
        monkeypatch.setitem(sys.modules, extra, None)
    lines = []
    paths = run_demo(tmp_path / "demo", steps=10, echo=lines.append, progress=False)
    text = "\n".join(lines)
    for n in range(1, 8):
        assert f"{n}. " in text
    assert pq.read_table(paths["subset"]).num_rows == 20
    rows = duck(paths["scores"], "SELECT count(*), count(alice), count(alice_rating) FROM scores")
    assert rows == [(96, 96, 96)]
    # the 4-star subset is what her calibrated rating says she would give 4 stars or more
    [(liked,)] = duck(paths["scores"], "SELECT count(*) FROM scores WHERE alice_rating >= 4")
    assert 0 < liked < 96 and pq.read_table(paths["four_stars"]).num_rows == liked
    assert f"the {liked} images she would give 4 stars or more" in text
    assert (paths["guidance"] / "alice" / "pairs.parquet").exists()
    assert json.loads((paths["scores"] / "_manifest.json").read_text())["profiles"][0]["name"] == "alice"


def test_old_spellings_still_work_for_a_release_with_a_note(scored, tmp_path):
    scores, _ = scored
    new = run("select", scores, "--column", "alice", "--top", "3", "--out", tmp_path / "new.parquet")
    old = CliRunner().invoke(cli, ["select", str(scores), "--profile", "alice", "--top", "3", "--out",
                                   str(tmp_path / "old.parquet")])
    assert new.exit_code == old.exit_code == 0
    assert "Note: --profile is now --column" in old.stderr and "Note:" not in new.stderr
    assert pq.read_table(tmp_path / "old.parquet").equals(pq.read_table(tmp_path / "new.parquet"))
    r = run("select", scores, "--top", "3", "--out", tmp_path / "none.parquet")
    assert r.exit_code == 2 and "Missing option --column" in r.output


def test_select_and_guidance_report_as_json(scored, tmp_path):
    scores, _ = scored
    r = run("select", scores, "--column", "alice", "--top", "5", "--out", tmp_path / "s.csv", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == {"out": str(tmp_path / "s.csv"), "images": 5, "column": "alice"}
    r = run("guidance", scores, "--column", "bob", "--out", tmp_path / "g", "--top", "4", "--bottom", "4", "--json")
    got = json.loads(r.stdout)
    assert r.exit_code == 0 and list(got) == ["bob"] and got["bob"]["exemplars"] == 4
