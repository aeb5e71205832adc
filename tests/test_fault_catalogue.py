"""The fault catalogue as a whole: what a new user throws at the tool, end to end through the CLI.

Each fault gets a row, a status or a one-line error, and never costs the work already done.
"""

import io
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from laionfilter.cli import cli

from .helpers import good_samples, write_shard


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _png(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _bomb(width=17000, height=17000) -> bytes:
    """A small PNG whose header claims width × height pixels, as decompression bombs do."""
    import struct
    import zlib

    data = bytearray(_png(Image.new("L", (8, 8))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """A folder of shards holding every kind of bad sample, and the status each must get."""
    root = tmp_path_factory.mktemp("faulty")
    src = root / "shards"
    src.mkdir()
    good = good_samples("g", 6, seed=40)
    grey = np.asarray(Image.open(io.BytesIO(good[0]["jpg"])).convert("L"))
    odd = [
        ("zero-byte", {"jpg": b""}, "unsupported"),
        ("truncated", {"jpg": good[1]["jpg"][: len(good[1]["jpg"]) // 3]}, "corrupt"),
        ("text", {"jpg": b"<html>not an image</html>"}, "unsupported"),
        ("bomb", {"png": _bomb()}, "bomb"),
        ("no-image", {"txt": b"caption only"}, "no_image"),
        ("grey16", {"png": _png(Image.fromarray(grey.astype(np.uint16) * 257))}, "ok"),
        ("la", {"png": _png(Image.fromarray(np.stack([grey, grey], -1), "LA"))}, "ok"),
        ("palette", {"png": _png(Image.open(io.BytesIO(good[2]["jpg"])).quantize(16), transparency=0)}, "ok"),
    ]
    samples = good[:3] + [{"__key__": k, **files} for k, files, _ in odd] + good[3:]
    write_shard(src / "00000.tar", samples)
    write_shard(src / "00001.tar", [])  # an empty shard
    whole = write_shard(root / "whole.tar", good_samples("t", 8, seed=41))
    (src / "00002.tar").write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])  # a truncated tar
    for s in range(3, 6):
        write_shard(src / f"{s:05d}.tar", good_samples(f"{s:05d}", 5, seed=s))
    expect = {s["__key__"]: "ok" for s in good} | {k: status for k, _, status in odd}
    return src, expect


def test_every_bad_sample_gets_its_row_and_status(faulty, profiles, small_bank, tmp_path):
    src, expect = faulty
    out = tmp_path / "scores"
    r = run("score", src, "--profile", profiles[0], "--bank", small_bank.path, "--out", out, "--workers", "2",
            "--device", "cpu", "--batch-size", "4")
    assert r.exit_code == 1 and "00002.tar" in r.output  # only the truncated tar fails the run
    rows = {x["key"]: x for x in pq.read_table(sorted(out.glob("*.parquet"))).to_pylist()}
    for key, status in expect.items():
        assert rows[key]["status"] == status, (key, rows[key]["error"])
        assert (rows[key]["alice"] is not None) == (status == "ok")
    assert 0 < sum(1 for x in rows.values() if x["shard"] == "00002") < 8
    assert pq.read_table(out / "00001.parquet").num_rows == 0


def test_kill_9_and_resume_scores_every_sample_once(faulty, profiles, small_bank, tmp_path):
    src, _ = faulty
    out = tmp_path / "scores"
    cmd = [sys.executable, "-m", "laionfilter", "score", str(src), "--profile", str(profiles[0]), "--bank",
           str(small_bank.path), "--out", str(out), "--workers", "0", "--device", "cpu", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*_stats.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("*_stats.json")))
    assert done_before < 6, "the run finished before it could be killed"
    r = run(*cmd[3:])  # the same command resumed, in this process
    assert r.exit_code == 1 and "00002.tar" in r.output  # the truncated tar
    rows = pq.read_table(sorted(out.glob("*.parquet"))).to_pylist()
    keys = [x["key"] for x in rows]
    assert len(keys) == len(set(keys))
    assert {f"{s:05d}{i:04d}" for s in range(3, 6) for i in range(5)} <= set(keys)
    # A process killed with -9 cannot remove the part it was writing; that file stays hidden
    # (.NAME.parquet.tmp-PID), and neither the scores nor DuckDB's *.parquet glob ever reads it.
    assert all(not p.name.startswith(".") for p in out.glob("*.parquet"))


def test_the_wrong_bank_and_pickles_are_refused(faulty, profiles, tasks, tmp_path):
    src, _ = faulty
    from laionfilter.bank import build_bank

    other = build_bank(tasks[:2], tmp_path / "other")
    r = run("score", src, "--profile", profiles[0], "--bank", other.path, "--out", tmp_path / "s")
    assert r.exit_code == 1 and "learned on" in r.output and not (tmp_path / "s").exists()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "evil.profile").write_bytes(pickle.dumps({"alpha": Payload()}, protocol=2))
    r = run("score", src, "--profile", tmp_path / "evil.profile", "--out", tmp_path / "s")
    assert r.exit_code == 1 and "never unpickles" in r.output and not (tmp_path / "pwned").exists()


def test_bad_ratings_names_sql_and_pipes_are_one_line_errors(faulty, profiles, small_bank, tmp_path):
    src, _ = faulty
    (tmp_path / "r.csv").write_text("image,score,user\nmissing.jpg,x,../../evil\n")
    r = run("learn", tmp_path / "r.csv", "--bank", small_bank.path, "--out", tmp_path / "p")
    assert r.exit_code == 1 and "row 2" in r.output and "not a number" in r.output and "not a plain name" in r.output
    assert not (tmp_path / "p").exists()

    out = tmp_path / "scores"
    run("score", src / "00003.tar", "--profile", profiles[0], "--bank", small_bank.path, "--out", out, "--workers", "0")
    r = run("query", out, "SELECT * FROM read_text('/etc/passwd')")
    assert r.exit_code == 1 and "Permission" in r.output and "root:" not in r.output
    r = run("select", out, "--profile", "alice", "--where", "1=1) OR (1=1", "--out", tmp_path / "x.parquet")
    assert r.exit_code == 1 and not (tmp_path / "x.parquet").exists()

    lst = tmp_path / "list.txt"
    lst.write_text(f"pipe:touch {tmp_path / 'ran'}\n")
    r = run("score", lst, "--profile", profiles[0], "--bank", small_bank.path, "--out", tmp_path / "t")
    assert r.exit_code == 1 and "--allow-pipe" in r.output and not (tmp_path / "ran").exists()
