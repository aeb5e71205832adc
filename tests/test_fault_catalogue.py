"""The fault catalogue as a whole: what a new user throws at the tool, end to end through the CLI.

Each fault gets a row, a status or a one-line error, and never costs the work already done.
"""

import csv
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from laionfilter.cli import cli

from .helpers import good_samples, tmpfs, write_shard


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
    import shutil

    src = shutil.copytree(faulty[0], tmp_path / "shards")
    for s in range(6, 10):  # enough work after the first shard that the kill lands before the end
        write_shard(src / f"{s:05d}.tar", good_samples(f"{s:05d}", 40, seed=s))
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
    assert done_before < 10, "the run finished before it could be killed"
    r = run(*cmd[3:])  # the same command resumed, in this process
    assert r.exit_code == 1 and "00002.tar" in r.output  # the truncated tar
    rows = pq.read_table(sorted(out.glob("*.parquet"))).to_pylist()
    keys = [x["key"] for x in rows]
    assert len(keys) == len(set(keys))
    assert {f"{s:05d}{i:04d}" for s in range(3, 6) for i in range(5)} <= set(keys)
    assert {f"{s:05d}{i:04d}" for s in range(6, 10) for i in range(40)} <= set(keys)
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
    r = run("select", out, "--column", "alice", "--where", "1=1) OR (1=1", "--out", tmp_path / "x.parquet")
    assert r.exit_code == 1 and not (tmp_path / "x.parquet").exists()

    lst = tmp_path / "list.txt"
    lst.write_text(f"pipe:touch {tmp_path / 'ran'}\n")
    r = run("score", lst, "--profile", profiles[0], "--bank", small_bank.path, "--out", tmp_path / "t")
    assert r.exit_code == 1 and "--allow-pipe" in r.output and not (tmp_path / "ran").exists()


# Round two: what an adversarial run from a fresh install found -------------------------------------

def test_a_pipe_made_by_brace_expansion_runs_nowhere_without_allow_pipe(shards, profiles, small_bank, ratings_csv,
                                                                        tmp_path):
    marker = tmp_path / "ran"
    lst = tmp_path / "list.txt"
    lst.write_text(f"{{pipe:touch {marker},{shards}/00000.tar}}\n")
    typed = f"{{pipe:touch {marker},{shards}/00000.tar}}"
    subset = tmp_path / "subset.parquet"
    pq.write_table(pa.table({"key": ["000000000"], "shard": ["00000"]}), subset)
    for spec in (lst, typed):
        runs = [("score", spec, "--profile", profiles[0], "--bank", small_bank.path, "--out", tmp_path / "s",
                 "--workers", "0", "--device", "cpu"),
                ("reshard", subset, "--shards", spec, "--out", tmp_path / "re"),
                ("learn", ratings_csv, "--shards", spec, "--bank", small_bank.path, "--out", tmp_path / "p.profile"),
                ("rate", spec, "--out", tmp_path / "r.csv"),
                ("suggest", spec, "--bank", small_bank.path)]
        for args in runs:
            r = run(*args)
            assert r.exit_code == 1 and "--allow-pipe" in r.output, (args[0], r.output)
            assert not marker.exists(), args[0]
    r = run("score", typed, "--profile", profiles[0], "--bank", small_bank.path, "--out", tmp_path / "s",
            "--workers", "0", "--device", "cpu", "--allow-pipe")
    assert marker.exists()  # the flag is what lets it run


def test_a_shard_named_like_a_pipe_is_a_file(shards, profiles, small_bank, tmp_path, monkeypatch):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "pipe:touch${IFS}X;cat${IFS}a.tar").write_bytes((shards / "00000.tar").read_bytes())
    monkeypatch.chdir(folder)
    for spec in (".", "*.tar"):
        out = tmp_path / f"scores-{len(spec)}"
        r = run("score", spec, "--profile", profiles[0], "--bank", small_bank.path, "--out", out, "--workers", "0",
                "--device", "cpu")
        assert r.exit_code == 0, r.output
        assert not (folder / "X").exists() and not (folder / "X;cat").exists()
        rows = pq.read_table(sorted(out.glob("*.parquet"))).to_pylist()
        assert len(rows) == 7 and {x["status"] for x in rows} == {"ok"}  # read from the file, not run


class RatingServer:
    """``laionfilter rate`` on a free port, in a thread of this process."""

    def __init__(self, folder, out, **kw):
        import threading

        from laionfilter.rate import Session, collect_images, serve

        self.session = Session(out, collect_images(str(folder), out=out), **kw)
        self.server = serve(self.session)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def request(self, method, path, body=b"", headers=None):
        """Status and JSON of one raw request (http.client, so that any header can be sent)."""
        import http.client
        import json

        con = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"Host": f"127.0.0.1:{self.port}", "Content-Type": "application/json", **(headers or {})}
        con.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers.items():
            if v is not None:
                con.putheader(k, v)
        con.endheaders(body if isinstance(body, bytes) else json.dumps(body).encode())
        r = con.getresponse()
        data = r.read()
        con.close()
        return r.status, (json.loads(data) if r.getheader("Content-Type") == "application/json" else data)

    def post(self, path, body, **headers):
        import json

        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", path, data, {"Content-Length": str(len(data)), **headers})

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def long_named_photos(tmp_path):
    """30 small JPEGs with 150-character names: each answer is a row of some 170 bytes."""
    from .helpers import crops, jpeg

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(crops(30, seed=50)):
        (folder / f"{i:02d}-{'x' * 150}.jpg").write_bytes(jpeg(img.resize((32, 32))))
    return folder


def _fill(disk):
    """Take every free byte of the tmpfs ``disk``."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_full_disk_while_rating_loses_only_that_answer(long_named_photos, tmp_path):
    with tmpfs(tmp_path / "disk") as disk:
        out = disk / "r.csv"
        server = RatingServer(long_named_photos, out)
        try:
            # Answers up to the end of the file's page, then a full disk: the next row fits only in part.
            while out.stat().st_size % 4096 < 4096 - 200 if out.exists() else True:
                n = server.post("/api/answer", {"item": server.session.next_item()["item"], "score": 5})
                assert n[0] == 200, n
            before = out.read_bytes()
            _fill(disk)
            status, body = server.post("/api/answer", {"item": server.session.next_item()["item"], "score": 7})
            assert status == 507 and "No space left on device" in body["error"] and "not" in body["error"]
            assert out.read_bytes() == before  # no fragment of the failed row
            status, _ = server.post("/api/undo", {})
            assert status == 507 and out.read_bytes() == before  # undo could not rewrite: nothing changed
            (disk / "filler").unlink()  # space comes back
            status, state = server.post("/api/answer", {"item": server.session.next_item()["item"], "score": 9})
            assert status == 200 and out.read_bytes().startswith(before)
            with open(out, newline="") as f:
                rows = list(csv.reader(f))[1:]
            assert len(rows) == state["rated"] and [r[1] for r in rows[-2:]] == ["5", "9"]
            assert all(Path(long_named_photos.parent / r[0]).is_file() for r in rows)  # every row names a photo
            assert server.post("/api/undo", {})[1]["rated"] == len(rows) - 1
        finally:
            server.stop()
        from laionfilter.rate import Session, collect_images

        again = Session(out, collect_images(str(long_named_photos), out=out))  # a rerun resumes from the file
        assert len(again.rows) == len(rows) - 1


def test_the_rating_api_takes_only_its_documented_types(long_named_photos, tmp_path):
    out = tmp_path / "r.csv"
    server = RatingServer(long_named_photos, out, scale=10)
    try:
        item = server.session.next_item()["item"]
        for body in ({"item": item, "score": True}, {"item": True, "score": 5}, {"item": [1], "score": 5},
                     {"item": item, "score": 5.5}, {"item": item, "score": 11}, {"item": item, "score": "5"},
                     {"item": 10 ** 40, "score": 5}, [item, 5]):
            status, reply = server.post("/api/answer", body)
            assert status == 400 and "error" in reply, body
        for body in ({"item": [1]}, {"unreadable": True, "bad": "x"}, {"item": {"a": 1}}):
            assert server.post("/api/skip", body)[0] == 400, body
        assert server.post("/api/answer", b"{not json")[0] == 400
        assert server.request("POST", "/api/answer", b"", {"Content-Length": "-1"})[0] == 411  # not a read to EOF
        assert server.request("POST", "/api/answer", b"", {"Content-Length": None})[0] == 411
        assert server.post("/api/answer", b"{" + b" " * 10_000 + b"}")[0] == 413
        assert server.request("GET", "/image/" + "9" * 5000)[0] == 404
        for raw in (b"/image/\xb2", b"/image/\xc3\xa9\xff"):  # non-ASCII bytes; a superscript 2 is a str.isdigit
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                s.sendall(b"GET %s HTTP/1.0\r\nHost: 127.0.0.1:%d\r\n\r\n" % (raw, server.port))
                assert s.recv(100).split(b" ")[1] == b"404", raw
        assert out.read_bytes() == b""  # nothing above wrote a row
        gone = sorted(long_named_photos.glob("29-*.jpg"))[0]
        gone.rename(gone.with_suffix(".away"))  # an image that vanished after the list was made
        try:
            status, reply = server.request("GET", "/image/29")
            assert status == 404 and "cannot read" in reply["error"]
        finally:
            gone.with_suffix(".away").rename(gone)
        status, state = server.post("/api/answer", {"item": item, "score": 5})
        assert status == 200 and state["rated"] == 1
    finally:
        server.stop()


def test_the_rating_server_answers_only_its_own_page(long_named_photos, tmp_path):
    out = tmp_path / "r.csv"
    server = RatingServer(long_named_photos, out)
    try:
        own = f"http://127.0.0.1:{server.port}"
        item = server.session.next_item()["item"]
        answer = {"item": item, "score": 5}
        # another site's page: a form or text/plain POST needs no preflight, so the browser sends it
        assert server.post("/api/answer", answer, Origin="https://evil.example")[0] == 403
        assert server.post("/api/answer", answer, Origin="null")[0] == 403
        assert server.post("/api/answer", answer, **{"Sec-Fetch-Site": "cross-site"})[0] == 403
        assert server.post("/api/answer", answer, **{"Content-Type": "text/plain", "Origin": own})[0] == 415
        # a DNS name rebound to 127.0.0.1: the page's own origin, but not this server's name
        rebound = {"Host": f"evil.example:{server.port}", "Origin": f"http://evil.example:{server.port}"}
        assert server.post("/api/answer", answer, **rebound)[0] == 421
        assert server.request("GET", "/api/state", headers={"Host": f"evil.example:{server.port}"})[0] == 421
        assert server.post("/api/undo", {}, Origin="https://evil.example")[0] == 403
        assert out.read_bytes() == b""
        # the page itself, under either loopback name, and a script without an Origin
        assert server.post("/api/answer", answer, Origin=own)[0] == 200
        local = {"Host": f"localhost:{server.port}", "Origin": f"http://localhost:{server.port}"}
        assert server.post("/api/undo", {}, **local)[1]["rated"] == 0
        assert server.post("/api/answer", answer)[0] == 200
    finally:
        server.stop()
