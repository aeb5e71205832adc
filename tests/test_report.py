"""`laionfilter report`: a self-contained page of what a profile selects, opened in the real browser."""

import json
import os
import shutil
from pathlib import Path

from click.testing import CliRunner

from laionfilter.cli import cli

DOCS = os.environ.get("LAIONFILTER_DOCS_SCREENSHOTS")  # set to docs/ to refresh the README's screenshot


def test_the_demo_writes_a_report_that_shows_its_thumbnails(browser, tmp_path):
    from laionfilter.demo import run_demo

    paths = run_demo(tmp_path / "demo", steps=10, echo=lambda _: None, progress=False)
    page = paths["report"]
    text = page.read_text()
    assert 'src="http' not in text and "<script" not in text and "<link" not in text  # nothing fetched
    shutil.rmtree(paths["shards"])  # self-contained: it needs neither the shards nor a server
    browser.set_window_size(1280, 1000)
    browser.get(page.as_uri())
    shown = browser.execute_script(
        "return [...document.images].filter(i => i.complete && i.naturalWidth > 0 && i.src.startsWith('data:')).length")
    assert shown >= 20
    captions = [e.text for e in browser.find_elements("css selector", "section:first-of-type figcaption")]
    assert len(captions) == 12 and all(1 <= float(c) <= 5 for c in captions)  # alice's own 1–5 stars
    # the top strip is in score order, and her calibrated rating is monotone in the score
    assert [float(c) for c in captions] == sorted((float(c) for c in captions), reverse=True)
    if DOCS:
        browser.save_screenshot(str(Path(DOCS) / "report.png"))


def test_a_report_finds_moved_shards_with_shards_and_says_what_it_missed(shards, profiles, small_bank, tmp_path):
    out = tmp_path / "scores"
    run = CliRunner().invoke
    assert run(cli, ["score", str(shards), "--profile", str(profiles[0]), "--bank", str(small_bank.path),
                     "--out", str(out), "--workers", "0"]).exit_code == 0
    moved = shutil.copytree(shards, tmp_path / "moved")
    r = run(cli, ["report", str(out), "--column", "alice", "--out", str(tmp_path / "a.html"), "--top", "3"])
    assert r.exit_code == 0 and "not found" not in r.output, r.output
    stats = sorted(out.glob("*_stats.json"))
    text = stats[0].read_text().replace(str(shards), str(tmp_path / "gone"))
    stats[0].write_text(text)  # as if that shard had moved away
    r = run(cli, ["report", str(out), "--column", "alice", "--out", str(tmp_path / "b.html"), "--json"])
    missed = json.loads(r.stdout)
    assert r.exit_code == 0 and missed["missing"] > 0
    r = run(cli, ["report", str(out), "--column", "alice", "--out", str(tmp_path / "c.html"), "--shards", str(moved),
                  "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["missing"] == 0
    piped = ["report", str(out), "--column", "alice", "--out", str(tmp_path / "e.html"), "--json",
             "--shards", f"pipe:cat {moved}/{{00000..00002}}.tar"]
    assert run(cli, piped).exit_code == 1  # a pipe runs only with --allow-pipe
    r = run(cli, [*piped, "--allow-pipe"])
    assert r.exit_code == 0 and json.loads(r.stdout)["missing"] == 0
    r = run(cli, ["report", str(out), "--column", "nobody", "--out", str(tmp_path / "d.html")])
    assert r.exit_code == 1 and "no scores for profile 'nobody'" in r.output


def test_a_report_on_a_folder_of_ones_own_images(profiles, small_bank, tmp_path):
    from laionfilter.demo import EXAMPLE

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, p in enumerate(sorted((EXAMPLE / "images").glob("*.jpg"))[:14]):
        shutil.copy(p, photos / ("sub" if i % 2 else ".") / p.name)
    run = CliRunner().invoke
    assert run(cli, ["score", str(photos), "--profile", str(profiles[0]), "--bank", str(small_bank.path),
                     "--out", str(tmp_path / "scores"), "--workers", "0"]).exit_code == 0
    r = run(cli, ["report", str(tmp_path / "scores"), "--column", "alice", "--out", str(tmp_path / "a.html"),
                  "--json"])
    got = json.loads(r.stdout)
    assert r.exit_code == 0 and got["images"] == 14 and got["missing"] == 0 and got["thumbnails"] >= 14
    assert "sub/" in (tmp_path / "a.html").read_text()  # keyed by path under the folder

    # A key from the scores names a path under the folder only: one that leaves it is not read.
    import pyarrow.parquet as pq

    secret = tmp_path / "secret.jpg"
    shutil.copy(next(photos.glob("*.jpg")), secret)
    part = tmp_path / "scores" / "images-00000.parquet"
    t = pq.read_table(part)
    keys = t.column("key").to_pylist()
    best = max(range(len(keys)), key=lambda i: t.column("alice")[i].as_py())
    keys[best] = "../secret.jpg"
    pq.write_table(t.set_column(t.schema.get_field_index("key"), "key", [keys]), part)
    r = run(cli, ["report", str(tmp_path / "scores"), "--column", "alice", "--out", str(tmp_path / "b.html"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["missing"] > 0
