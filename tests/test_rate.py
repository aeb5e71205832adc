"""`laionfilter rate`: the real page in headless Chromium through Selenium, and the server's guarantees."""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from laionfilter.errors import LaionfilterError
from laionfilter.recipe import LearnConfig
from laionfilter.profile import learn_profiles
from laionfilter.rate import Session, collect_images, serve

from .helpers import crops, jpeg, tmpfs

DOCS = os.environ.get("LAIONFILTER_DOCS_SCREENSHOTS")  # set to docs/ to refresh docs/rating.md's screenshots


@pytest.fixture
def photos(tmp_path):
    """Ten of the demo's photos (128 pixels), as docs/rating.md's screenshots show them."""
    from laionfilter.demo import EXAMPLE

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(10):
        shutil.copy(EXAMPLE / "images" / f"{i:02d}.jpg", folder / f"{i:02d}.jpg")
    return folder


def rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


class Running:
    """A rating server on a free port, in a thread of this process."""

    def __init__(self, session: Session):
        self.session, self.server = session, serve(session)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def press(driver, key, before):
    """Send a key to the page and wait until it shows the next item (or the same, after an error)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    ActionChains(driver).send_keys(key).perform()
    WebDriverWait(driver, 10).until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready") != before
                                    or not d.find_element("id", "done").get_attribute("hidden"))


def ready(driver):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready"))
    return driver.find_element("tag name", "body").get_attribute("data-ready")


def test_stars_by_keyboard_resume_and_undo_then_pairs_then_learn(browser, photos, tmp_path, small_bank, monkeypatch):
    from selenium.webdriver.common.keys import Keys

    monkeypatch.chdir(tmp_path)  # the page names the output as given: a short relative path, as a user types it
    out = Path("my-ratings.csv")
    run = Running(Session(out, collect_images(str(photos), out=out), mode="stars", scale=10, target=8))
    browser.get(run.url)
    shown = []
    for key in "3918274":  # 7 answers: 3, 9, 1, 8, 2, 7, 4
        state = ready(browser)
        shown.append(browser.find_element("id", "single-label").text)
        if key == "4":
            break
        press(browser, key, state)
    if DOCS:
        browser.save_screenshot(str(Path(DOCS) / "rate-stars.png"))
    assert [r[1] for r in rows(out)] == ["3", "9", "1", "8", "2", "7"]
    assert [r[0] for r in rows(out)] == shown[:6]
    run.stop()

    # A new server on the same file resumes: the 6 rated images are not shown again.
    run = Running(Session(out, collect_images(str(photos), out=out), mode="stars", scale=10, target=8))
    browser.get(run.url)
    state = ready(browser)
    assert browser.find_element("id", "single-label").text not in shown[:6]
    assert browser.find_element("id", "count").text == "6 / 8" and len(rows(out)) == 6
    press(browser, "0", state)  # 0 is 10
    assert rows(out)[-1][1] == "10" and len(rows(out)) == 7
    press(browser, Keys.BACKSPACE, ready(browser))  # undo the last answer
    assert len(rows(out)) == 6 and browser.find_element("id", "count").text == "6 / 8"
    assert b"\r" not in out.read_bytes()  # LF line ends, whether rows were appended or rewritten by undo
    run.stop()

    pairs_out = Path("my-pairs.csv")
    run = Running(Session(pairs_out, collect_images(str(photos), out=pairs_out), mode="pairs", target=4))
    browser.get(run.url)
    for key in (Keys.ARROW_LEFT, Keys.ARROW_DOWN, Keys.ARROW_RIGHT, Keys.ARROW_LEFT):
        state = ready(browser)
        if key == Keys.ARROW_LEFT and len(rows(pairs_out)) == 3 and DOCS:
            browser.save_screenshot(str(Path(DOCS) / "rate-pairs.png"))
        press(browser, key, state)
    assert [r[2] for r in rows(pairs_out)] == ["a", "tie", "b", "a"]
    assert len({frozenset(r[:2]) for r in rows(pairs_out)}) == 4
    assert not browser.find_element("id", "done").get_attribute("hidden")  # the target is reached
    run.stop()

    for f in (out, pairs_out):
        [profile] = learn_profiles(f, small_bank, tmp_path / f"{f.stem}.profile", LearnConfig(steps=3, device="cpu"),
                                   progress=False)
        assert profile.path.exists() and profile.meta["ratings"]["images"] >= 5
    assert profile.meta["ratings"]["pairs"] == 3 and profile.meta["ratings"]["ties"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_killed_server_keeps_every_acknowledged_answer(photos, tmp_path):
    out = tmp_path / "r.csv"
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "laionfilter", "rate", str(photos), "--out", str(out), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                state = json.loads(urllib.request.urlopen(base + "/api/state", timeout=2).read())
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        acknowledged = []
        for score in (4, 8, 2):
            state = _post(base + "/api/answer", {"item": state["next"]["item"], "score": score})
            acknowledged.append(score)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [int(r[1]) for r in rows(out)] == acknowledged


def test_no_url_reaches_outside_source(photos, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve me")
    run = Running(Session(tmp_path / "r.csv", collect_images(str(photos), out=tmp_path / "r.csv")))
    try:
        for path in ("/image?path=../../secret.txt", "/image/../secret.txt", "/image/..%2F..%2Fsecret.txt",
                     "/static/../../secret.txt", "/static/%2e%2e/rate.py", f"/image/{10 ** 6}", "/image/-1",
                     "/" + str(secret)):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(run.url.rstrip("/") + path, timeout=5)
            assert e.value.code == 404, path
        assert urllib.request.urlopen(run.url + "image/0", timeout=5).read()[:2] == b"\xff\xd8"  # a real JPEG
    finally:
        run.stop()


def test_bad_input_is_refused_before_serving(photos, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LaionfilterError, match="no images"):
        collect_images(str(empty))
    pairs = tmp_path / "p.csv"
    pairs.write_text("image_a,image_b,winner\nx.jpg,y.jpg,a\n")
    with pytest.raises(LaionfilterError, match="holds a pairs file"):
        Session(pairs, collect_images(str(photos)), mode="stars")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with pytest.raises(LaionfilterError, match=f"127.0.0.1:{busy.getsockname()[1]}.*in use"):
            serve(Session(tmp_path / "r.csv", collect_images(str(photos))), port=busy.getsockname()[1])
    finally:
        busy.close()
    session = Session(tmp_path / "s.csv", collect_images(str(photos), out=tmp_path / "s.csv"))
    session.skip({"unreadable": True, "bad": 0})
    assert list(session.unreadable) == ["photos/00.jpg"] and session.next_item()["item"] != 0


def test_a_read_only_output_is_refused_before_serving(photos, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        with pytest.raises(LaionfilterError, match="cannot write answers there"):
            Session(mnt / "r.csv", collect_images(str(photos)))


def _box(driver, element_id):
    return driver.execute_script(
        "const i = document.getElementById(arguments[0]); const r = i.getBoundingClientRect();"
        "return [i.naturalWidth, i.naturalHeight, r.width, r.height, r.left, r.top, r.right, r.bottom,"
        " window.innerWidth, window.innerHeight, i.complete];", element_id)


def test_images_are_shown_whole_never_enlarged_and_the_mouse_skips_and_undoes(browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.support.ui import WebDriverWait

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a-small.jpg").write_bytes(jpeg(crops(1, seed=5)[0].resize((64, 48))))
    (folder / "b-wide.jpg").write_bytes(jpeg(Image.new("RGB", (3000, 600), (200, 90, 40))))
    out = tmp_path / "r.csv"
    items = collect_images(str(folder), out=out)
    run = Running(Session(out, items, target=2, order_hint=[0, 1]))  # the small one first
    try:
        browser.get(run.url)
        ready(browser)
        WebDriverWait(browser, 10).until(lambda d: _box(d, "single")[-1] and _box(d, "single")[0])
        nw, nh, w, h, *_ = _box(browser, "single")
        assert (nw, nh) == (64, 48) and (round(w), round(h)) == (64, 48)  # its own size: not upscaled
        assert "64 × 48 px" in browser.find_element("id", "single-size").text
        assert "1 = not at all, 10 = very much" in browser.find_element("id", "question").text
        state = ready(browser)
        browser.find_element("id", "skip").click()  # skip by mouse
        WebDriverWait(browser, 10).until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready") != state)
        WebDriverWait(browser, 10).until(lambda d: _box(d, "single")[0] == 3000 and _box(d, "single")[-1])
        nw, nh, w, h, left, top, right, bottom, vw, vh, _ = _box(browser, "single")
        assert w < nw and abs(w / h - nw / nh) < 0.01  # scaled down to fit, whole: the aspect ratio kept
        assert left >= 0 and top >= 0 and right <= vw and bottom <= vh  # and inside the window: never cropped
        assert "shown at" in browser.find_element("id", "single-size").text
        state = ready(browser)
        browser.find_element("css selector", "#buttons button:nth-child(7)").click()  # 7 stars, by mouse
        WebDriverWait(browser, 10).until(lambda d: rows(out))
        assert rows(out) == [["mixed/b-wide.jpg", "7"]]
        browser.find_element("id", "undo").click()  # undo by mouse
        WebDriverWait(browser, 10).until(lambda d: not rows(out))
        # the file is rewritten before the server answers; the page counts once the answer arrives
        WebDriverWait(browser, 10).until(lambda d: d.find_element("id", "count").text == "0 / 2")
    finally:
        run.stop()


def test_the_done_page_gives_the_learn_command_for_the_source(shards, photos, tmp_path):
    from laionfilter.rate import learn_command

    out = tmp_path / "r.csv"
    assert learn_command(str(shards), out) == f"laionfilter learn {out} --shards {shards} --out me.profile"
    assert learn_command(str(photos), out, user="ann") == f"laionfilter learn {out} --out profiles/"
    session = Session(out, collect_images(str(photos)), learn_command=learn_command(str(photos), out))
    assert session.state()["learn_command"] == f"laionfilter learn {out} --out me.profile"
    ann = Session(tmp_path / "ann.csv", collect_images(str(photos)), user="ann")  # built without a command
    assert ann.state()["learn_command"] == f"laionfilter learn {tmp_path / 'ann.csv'} --out profiles/"
