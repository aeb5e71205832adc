"""One test (or more) per defect of the hardening issue: each failed before its fix."""

import io
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from laionfilter.cli import cli
from laionfilter.errors import LaionfilterError
from laionfilter.images import ImageDecodeError, Preprocessor, decode
from laionfilter.recipe import LearnConfig
from laionfilter.names import check_name, child_path
from laionfilter.profile import learn_profiles, load_profile
from laionfilter.score import ScoreConfig, score_shards
from laionfilter.train.starter import load_photo

from .helpers import good_samples, jpeg, tmpfs, write_shard


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r) -> str:
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit), r.output
    lines = [x[x.index("Error"):] for x in r.output.strip().splitlines() if "Error" in x]  # after a progress bar
    assert len(lines) == 1, r.output
    return lines[0]


def ratings_with_users(ratings_csv: Path, tmp_path: Path, users: list[str]) -> Path:
    """The fixture's 24 rated images, split among ``users`` (each gets distinct scores)."""
    rows = ratings_csv.read_text().splitlines()[1:]
    for p in (ratings_csv.parent / "img").iterdir():
        (tmp_path / "img").mkdir(exist_ok=True)
        shutil.copy(p, tmp_path / "img" / p.name)
    lines = ["image,score,user"] + [f"{r},{users[i % len(users)]}" for i, r in enumerate(rows)]
    path = tmp_path / "users.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# 1. Names -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../../evil", "/srv/evil", "x/y", ".hidden", "a b"])
def test_a_user_name_that_is_not_plain_is_refused_by_row_and_nothing_is_written(small_bank, ratings_csv, tmp_path, bad):
    table = ratings_with_users(ratings_csv, tmp_path, ["alice", bad])
    out = tmp_path / "deep" / "profiles"
    r = run("learn", table, "--bank", small_bank.path, "--out", out, "--steps", "1", "--device", "cpu")
    line = one_line_error(r)
    assert "row 3" in r.output and "not a plain name" in r.output and "nothing was learned" in line
    assert not list(tmp_path.rglob("*.profile")) and not Path("/srv/evil.profile").exists()


def test_names_that_differ_only_in_case_collide(small_bank, ratings_csv, tmp_path):
    table = ratings_with_users(ratings_csv, tmp_path, ["Alice", "alice"])
    with pytest.raises(LaionfilterError, match="collide"):
        learn_profiles(table, small_bank, tmp_path / "out", LearnConfig(steps=1, device="cpu"), progress=False)


def test_unicode_names_are_kept_whole(small_bank, ratings_csv, tmp_path, shards):
    table = ratings_with_users(ratings_csv, tmp_path, ["zoë", "花子"])
    paths = learn_profiles(table, small_bank, tmp_path / "out", LearnConfig(steps=1, device="cpu"), progress=False)
    assert sorted(p.path.name for p in paths) == sorted(["zoë.profile", "花子.profile"])
    s = score_shards(str(shards), [tmp_path / "out"], tmp_path / "scores", bank=small_bank,
                     cfg=ScoreConfig(workers=0, device="cpu"), progress=False)
    assert set(s["columns"]) == {"zoë", "花子"}
    assert s["rating_columns"] == {"zoë_rating": "zoë", "花子_rating": "花子"}  # both learned calibrated
    g = run("guidance", tmp_path / "scores", "--out", tmp_path / "g", "--top", "2", "--bottom", "2", "--pairs", "2",
            "--margin", "0")
    assert g.exit_code == 0, g.output
    assert (tmp_path / "g" / "zoë" / "exemplars.parquet").exists()


def test_a_name_from_a_scores_file_cannot_leave_guidance_out(tmp_path):
    scores = tmp_path / "scores"
    scores.mkdir()
    pq.write_table(pa.table({"key": ["a", "b"], "url": ["u", "v"], "caption": ["c", "d"], "shard": ["s", "s"],
                             "width": [1, 1], "height": [1, 1], "status": ["ok", "ok"], "error": [None, None],
                             "../../evil": [1.0, 2.0]}), scores / "s.parquet")
    r = run("guidance", scores, "--out", tmp_path / "g" / "out")
    assert "not a plain name" in one_line_error(r)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "g").exists()


def test_a_profile_whose_stored_name_is_a_path_is_refused(profiles, tmp_path):
    from laionfilter.safefiles import read_safetensors, write_safetensors

    tensors, meta = read_safetensors(profiles[0])
    write_safetensors(tmp_path / "evil.profile", tensors, {**meta, "name": "../../evil"})
    with pytest.raises(LaionfilterError, match="not a plain name"):
        load_profile(tmp_path / "evil.profile")


def test_child_path_stays_inside_its_parent(tmp_path):
    assert child_path(tmp_path, "alice", ".profile") == tmp_path / "alice.profile"
    for bad in ("..", "../x", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(LaionfilterError):
            child_path(tmp_path, bad)
    assert check_name("zoe\u0308") == "zoë"  # NFC: one spelling per name


# 2. Every image mode -------------------------------------------------------------------------------

def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _forms():
    """(name, encoded bytes, the 8-bit RGB image it should decode as, pixel tolerance)."""
    cv2 = pytest.importorskip("cv2")  # PIL cannot write 16-bit RGB PNGs; OpenCV (img2dataset's) can
    rgb = Image.fromarray(load_photo("coffee")[100:228, 150:310])
    a = np.asarray(rgb)
    grey = rgb.convert("L")
    g = np.asarray(grey)
    pal = rgb.quantize(64)
    forms = [
        ("rgb8", _png(rgb), rgb, 0),
        ("rgb16", cv2.imencode(".png", a[..., ::-1].astype(np.uint16) * 257)[1].tobytes(), rgb, 0),
        ("grey16 (I;16)", _png(Image.fromarray(g.astype(np.uint16) * 257)), grey.convert("RGB"), 0),
        ("LA", _png(Image.fromarray(np.stack([g, np.full_like(g, 128)], -1), "LA")), grey.convert("RGB"), 0),
        ("RGBA", _png(Image.fromarray(np.concatenate([a, np.full_like(a[..., :1], 7)], -1), "RGBA")), rgb, 0),
        ("palette + transparency", _png(pal, transparency=0), pal.convert("RGB"), 0),
    ]
    cmyk = io.BytesIO()
    rgb.convert("CMYK").save(cmyk, "JPEG", quality=95)
    forms.append(("CMYK JPEG", cmyk.getvalue(), rgb, 12))  # JPEG is lossy: a mean error bound below
    return forms


def test_every_image_mode_decodes_to_its_8_bit_rgb_pixels_and_scores_alike(small_bank):
    pre = Preprocessor(small_bank.architecture.preprocess)
    model = small_bank.task_model(0)
    scores = {}
    for name, data, expect, tol in _forms():
        got = decode(data)
        want = torch.from_numpy(np.array(expect)).permute(2, 0, 1)
        assert got.dtype == torch.uint8 and got.shape == want.shape, name
        diff = (got.int() - want.int()).abs().float()
        assert (diff.mean() <= tol / 4 if tol else diff.max() == 0), (name, float(diff.mean()), float(diff.max()))
        with torch.no_grad():
            scores[name] = float(model(pre(data)[None]))
    assert abs(scores["rgb16"] - scores["rgb8"]) < 1e-4  # was 8.06 against 2.87 before the fix
    assert abs(scores["RGBA"] - scores["rgb8"]) < 1e-4
    assert abs(scores["CMYK JPEG"] - scores["rgb8"]) < 0.1


@pytest.mark.parametrize("mode, array", [("I", np.arange(64 * 64, dtype=np.int32).reshape(64, 64) * 1000),
                                         ("F", np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64))])
def test_modes_without_an_8_bit_range_are_refused_not_scored(mode, array):
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "TIFF")
    with pytest.raises(ImageDecodeError) as e:
        decode(buf.getvalue())
    assert e.value.kind == "unsupported" and f"mode {mode}" in str(e.value)


def test_16_bit_png_in_a_shard_scores_like_its_8_bit_copy(profiles, small_bank, tmp_path):
    cv2 = pytest.importorskip("cv2")
    img = Image.fromarray(load_photo("flower")[50:150, 60:180])
    a = np.asarray(img)
    write_shard(tmp_path / "s.tar", [{"__key__": "eight", "png": _png(img)},
                                     {"__key__": "sixteen", "png": cv2.imencode(".png", a[..., ::-1].astype(np.uint16) * 257)[1].tobytes()}])
    out = tmp_path / "scores"
    score_shards(str(tmp_path / "s.tar"), profiles[:1], out, bank=small_bank, cfg=ScoreConfig(workers=0, device="cpu"),
                 progress=False)
    rows = {r["key"]: r for r in pq.read_table(out / "s.parquet").to_pylist()}
    assert rows["sixteen"]["status"] == "ok" and abs(rows["sixteen"]["alice"] - rows["eight"]["alice"]) < 1e-4


# 3. SQL stays inside the scores --------------------------------------------------------------------

@pytest.fixture(scope="module")
def scored(profiles, small_bank, tmp_path_factory):
    root = tmp_path_factory.mktemp("sql")
    write_shard(root / "00000.tar", good_samples("00000", 6, seed=3))
    out = root / "scores"
    score_shards(str(root / "00000.tar"), profiles, out, bank=small_bank, cfg=ScoreConfig(workers=0, device="cpu"),
                 progress=False)
    secret = root / "secret.csv"
    secret.write_text("line\nroot:x:0:0\n")
    return out, secret


def test_where_cannot_close_its_parentheses_or_read_files(scored, tmp_path):
    out, secret = scored
    escape = f"1=0) UNION ALL SELECT line, NULL, NULL, NULL, 1.0 FROM read_csv('{secret}') WHERE (1=1"
    r = run("select", out, "--column", "alice", "--where", escape, "--out", tmp_path / "subset.csv")
    assert "not one SQL expression" in one_line_error(r)
    sub = f"key IN (SELECT line FROM read_csv('{secret}'))"
    r = run("select", out, "--column", "alice", "--where", sub, "--out", tmp_path / "subset.csv")
    assert "Permission" in one_line_error(r)
    assert not (tmp_path / "subset.csv").exists()
    ok = run("select", out, "--column", "alice", "--where", "width > 0 AND caption LIKE 'photo%'", "--out",
             tmp_path / "subset.csv")
    assert ok.exit_code == 0 and "6 images" in ok.output


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('{secret}')",
    "COPY (SELECT 1 AS x) TO '{target}'",
    "COPY scores TO '{scores}/00000.parquet' (FORMAT parquet, USE_TMP_FILE false)",
    "ATTACH '{target}' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SELECT * FROM glob('/etc/*')",
])
def test_query_cannot_touch_other_files_or_load_extensions(scored, tmp_path, sql):
    out, secret = scored
    before = (out / "00000.parquet").read_bytes()
    target = tmp_path / "written.csv"
    r = run("query", out, sql.format(secret=secret, target=target, scores=out))
    assert one_line_error(r).startswith("Error: SQL error")
    assert not target.exists() and (out / "00000.parquet").read_bytes() == before


def test_query_unsafe_is_the_explicit_opt_out(scored, tmp_path):
    out, secret = scored
    r = run("query", out, f"SELECT count(*) AS n FROM read_csv('{secret}')", "--unsafe")
    assert r.exit_code == 0 and "1" in r.output.splitlines()[-1]


# 4. Shard lists ------------------------------------------------------------------------------------

def test_a_pipe_line_in_a_list_file_needs_allow_pipe(shards, profiles, small_bank, tmp_path):
    marker = tmp_path / "ran"
    lst = tmp_path / "list.txt"
    lst.write_text(f"{shards}/00000.tar\npipe:touch {marker} && cat {shards}/00001.tar\n")
    out = tmp_path / "scores"
    r = run("score", lst, "--profile", profiles[0], "--bank", small_bank.path, "--out", out, "--workers", "0",
            "--device", "cpu")
    line = one_line_error(r)
    assert "line 2" in line and "--allow-pipe" in line and not marker.exists() and not out.exists()
    r = run("reshard", tmp_path / "none.parquet", "--shards", lst, "--out", tmp_path / "re")
    assert r.exit_code != 0 and not marker.exists()
    r = run("score", lst, "--profile", profiles[0], "--bank", small_bank.path, "--out", out, "--workers", "0",
            "--device", "cpu", "--allow-pipe")
    assert r.exit_code == 0, r.output
    assert marker.exists()


def test_a_failing_pipe_is_one_line_naming_command_and_status(profiles, small_bank, tmp_path):
    r = run("score", "pipe:exit 3", "--profile", profiles[0], "--bank", small_bank.path, "--out", tmp_path / "s",
            "--workers", "0", "--device", "cpu", "--allow-pipe")
    assert r.exit_code == 1
    assert "command 'exit 3' exited with status 3" in r.output and "OSError" not in r.output


def test_a_url_that_would_break_out_of_the_shell_quotes_is_refused(tmp_path):
    from laionfilter.shards import expand_shards

    lst = tmp_path / "list.txt"
    lst.write_text("https://example.com/a.tar'; touch /tmp/pwned; echo '\n")
    with pytest.raises(LaionfilterError, match="line 1.*quote"):
        expand_shards(str(lst))


# 5. One-line errors, nothing half-written -----------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped elsewhere)."""
    with tmpfs(tmp_path / "disk") as mnt:
        yield mnt


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(small_disk, shards, profiles, small_bank):
    (small_disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 4096 * 2))  # almost full
    r = run("score", shards, "--profile", profiles[0], "--bank", small_bank.path, "--out", small_disk / "scores",
            "--workers", "0", "--device", "cpu")
    line = one_line_error(r)
    assert "No space left on device" in line and str(small_disk) in line
    assert not [p for p in small_disk.rglob("*") if ".tmp-" in p.name]


def test_a_read_only_folder_is_one_line(tmp_path, shards, profiles, small_bank):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        r = run("learn", tmp_path / "missing.csv", "--out", mnt / "me.profile")
        assert r.exit_code == 2  # click: the ratings file does not exist
        r = run("score", shards, "--profile", profiles[0], "--bank", small_bank.path, "--out", mnt / "scores",
                "--workers", "0", "--device", "cpu")
        assert "Read-only file system" in one_line_error(r)


def test_files_of_the_wrong_kind_are_one_line_naming_them(scored, tmp_path, shards):
    out, _ = scored
    meta = tmp_path / "meta.parquet"
    meta.write_text("not parquet at all")
    assert str(meta) in one_line_error(run("select", out, "--column", "alice", "--join", meta, "--out", tmp_path / "x.parquet"))
    csv_meta = tmp_path / "meta.csv"
    csv_meta.write_text("key,punsafe\n000000000,0.5\n")
    r = run("select", out, "--column", "alice", "--join", csv_meta, "--where", "punsafe < 1", "--out", tmp_path / "j.parquet")
    assert r.exit_code == 0 and "1 images" in r.output, r.output
    tar = shards / "00000.tar"
    assert str(tar) in one_line_error(run("query", tar, "SELECT 1"))
    r = run("bank", "starter", "--out", tmp_path / "b", "--job", tmp_path / "missing.toml")
    assert r.exit_code == 2 and "missing.toml" in r.output and "Traceback" not in r.output


# 6. Exit codes --------------------------------------------------------------------------------------

def test_unreadable_images_are_data_and_exit_0_unless_strict(profiles, small_bank, tmp_path):
    samples = good_samples("k", 4, seed=9)
    samples[1]["jpg"] = b"broken"
    write_shard(tmp_path / "s.tar", samples)
    args = ["score", tmp_path / "s.tar", "--profile", profiles[0], "--bank", small_bank.path, "--workers", "0",
            "--device", "cpu"]
    r = run(*args, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert "1 shard(s) done, 0 failed" in r.output and "3 images scored, 1 not scored" in r.output
    assert run(*args, "--out", tmp_path / "b", "--strict").exit_code == 1


def test_fetch_exits_non_zero_when_nothing_was_fetched(tmp_path):
    pytest.importorskip("img2dataset")
    subset = tmp_path / "subset.parquet"
    pq.write_table(pa.table({"url": [f"file://{tmp_path}/missing-{i}.jpg" for i in range(3)],
                             "caption": ["a", "b", "c"]}), subset)
    r = run("fetch", subset, "--out", tmp_path / "dl", "--download-threads", "2")
    assert r.exit_code == 1 and "0 of 3" in r.output and "nothing was downloaded" in r.output


# 7. Moving the bank ---------------------------------------------------------------------------------

def test_a_moved_bank_is_named_and_found_with_bank_or_by_fingerprint(small_bank, ratings_csv, shards, tmp_path):
    moved = tmp_path / "bank-a"
    shutil.copytree(small_bank.path, moved)
    from laionfilter.bank import load_bank

    prof = learn_profiles(ratings_csv, load_bank(moved), tmp_path / "me.profile", LearnConfig(steps=1, device="cpu"),
                          progress=False)[0].path
    moved.rename(tmp_path / "bank-b")
    r = run("score", shards, "--profile", prof, "--out", tmp_path / "s", "--workers", "0", "--device", "cpu")
    line = one_line_error(r)
    assert small_bank.fingerprint[:16] in line and "--bank" in line and "sharpness" in line
    r = run("score", shards, "--profile", prof, "--bank", tmp_path / "bank-b", "--out", tmp_path / "s", "--workers", "0",
            "--device", "cpu")
    assert r.exit_code == 0, r.output


def test_a_starter_profile_is_found_wherever_the_package_is(shards, tmp_path, monkeypatch):
    from laionfilter.bank import resolve_bank
    from laionfilter.safefiles import read_safetensors, write_safetensors

    starter = resolve_bank("starter")
    ratings = tmp_path / "r.csv"
    imgs = tmp_path / "img"
    imgs.mkdir()
    for i, s in enumerate(good_samples("r", 6, seed=4)):
        (imgs / f"{i}.jpg").write_bytes(s["jpg"])
    ratings.write_text("image,score\n" + "".join(f"img/{i}.jpg,{i}\n" for i in range(6)))
    prof = learn_profiles(ratings, starter, tmp_path / "me.profile", LearnConfig(steps=1, device="cpu"), progress=False)[0].path
    tensors, meta = read_safetensors(prof)
    meta["bank"]["path"] = "relative/old/install/starter-bank"  # as recorded on another machine
    write_safetensors(prof, tensors, meta)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LAIONFILTER_BANK", raising=False)
    s = score_shards(str(shards), [prof], tmp_path / "s", cfg=ScoreConfig(workers=0, device="cpu"), progress=False)
    assert s["scored"] == 21


# 8. Column names ------------------------------------------------------------------------------------

def test_columns_are_named_by_file_or_name_equals_path_and_never_twice(profiles, small_bank, shards, tmp_path):
    copy = tmp_path / "me.profile"
    shutil.copy(profiles[0], copy)
    r = run("score", shards, "--profile", copy, "--profile", f"you={profiles[1]}", "--bank", small_bank.path,
            "--out", tmp_path / "s", "--workers", "0", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert f"me ← {copy}" in r.output and f"you ← {profiles[1]}" in r.output
    assert pq.read_schema(tmp_path / "s" / "00000.parquet").names[-4:] == ["me", "you", "me_rating", "you_rating"]
    r = run("score", shards, "--profile", f"Me={profiles[1]}", "--profile", copy, "--bank", small_bank.path,
            "--out", tmp_path / "t", "--workers", "0", "--device", "cpu")
    assert "collide" in one_line_error(r) and not (tmp_path / "t").exists()
    r = run("score", shards, "--profile", f"key={profiles[1]}", "--bank", small_bank.path, "--out", tmp_path / "t")
    assert "collide" in one_line_error(r)


# 9. Smaller -----------------------------------------------------------------------------------------

def test_demo_refuses_to_replace_its_outputs_before_touching_them(tmp_path):
    (tmp_path / "alice.profile").write_text("kept")
    r = run("demo", "--out", tmp_path)
    assert "--overwrite" in one_line_error(r)
    assert (tmp_path / "alice.profile").read_text() == "kept"
    assert "--overwrite" in run("demo", "--help").output


def test_help_and_info_say_what_is_true():
    assert "cache" not in run("learn", "--help").output
    assert "--out" in run("bank", "starter", "--help").output and run("bank", "starter").exit_code == 2
    r = run("bank", "info", "starter")
    assert r.exit_code == 0 and "sb4" not in r.output and "base lf-tiny-vit:base.safetensors" in r.output  # built in /tmp/sb4


def test_a_semicolon_separated_csv_gets_a_hint(small_bank, tmp_path):
    (tmp_path / "r.csv").write_text("image;score\na.jpg;1\n")
    r = run("learn", tmp_path / "r.csv", "--bank", small_bank.path, "--out", tmp_path / "p.profile")
    assert "';'-separated" in one_line_error(r)


def test_one_pixel_limit_named_and_settable():
    big = Image.new("L", (9600, 9600), 128)  # 92 Mpx: over PIL's 89.5 Mpx warning, under our 256 Mpx limit
    buf = io.BytesIO()
    big.save(buf, "PNG")
    assert decode(buf.getvalue()).shape == (3, 9600, 9600)
    small = jpeg(Image.new("RGB", (120, 100)))
    with pytest.raises(ImageDecodeError, match="12000 pixels is over the 10000-pixel limit .*--max-pixels") as e:
        decode(small, max_pixels=10_000)
    assert e.value.kind == "bomb"


def test_evaluate_progress_counts_steps(small_bank, tmp_path, capsys):
    from laionfilter.evaluate import evaluate

    rows = ["user,image,score"]
    imgs = tmp_path / "img"
    imgs.mkdir()
    for i, s in enumerate(good_samples("e", 14, seed=12)):
        (imgs / f"{i}.jpg").write_bytes(s["jpg"])
        rows.append(f"u,img/{i}.jpg,{i % 5}")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    methods = {"zero-shot ensemble": "zero-shot ensemble",
               "learned": LearnConfig(steps=7, device="cpu", calibration="none"),
               "calibrated": LearnConfig(steps=7, device="cpu", folds=2),
               "calibrated, backprop": LearnConfig(steps=7, device="cpu", folds=2, fit="backprop")}
    evaluate(tmp_path / "t.csv", small_bank, shots=(4,), trials=2, methods=methods, device="cpu", progress=True)
    err = capsys.readouterr().err
    # 2 trials × (1 baseline + 7 steps + twice 3 fits of 7 steps)
    assert "100/100" in err and "step" in err


def test_a_progress_bar_redraws_rarely_in_a_log_file_and_as_usual_on_a_terminal(tmp_path, monkeypatch):
    import io

    from laionfilter.log import LOG_REFRESH_S, progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def interval(file) -> float:
        with progress_bar(total=3, file=file) as bar:
            return bar.mininterval

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    with open(tmp_path / "job.log", "w") as log:
        assert interval(log) == LOG_REFRESH_S
        monkeypatch.setenv("TQDM_MININTERVAL", "5")  # the user's say: tqdm reads it (when imported)
        assert interval(log) != LOG_REFRESH_S
    monkeypatch.delenv("TQDM_MININTERVAL")
    assert interval(Terminal()) < 1


def test_in_a_log_a_progress_bar_never_shares_a_line_with_a_result(tmp_path):
    import io

    from laionfilter.log import progress_bar

    with open(tmp_path / "job.log", "w") as log:  # 2>&1 into one file, as a batch job's log is
        bar = progress_bar(total=2, file=log, leave=False, desc="fit")
        bar.update(2)
        bar.close()
        log.write("profile written\n")
    lines = (tmp_path / "job.log").read_text().split("\n")  # lines as a log viewer shows them
    assert lines[-2] == "profile written" and "fit" in lines[-3]  # the bar's last state ends its own line

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert progress_bar(total=1, file=Terminal(), leave=False).leave is False  # a terminal clears it as asked


# Round two ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("score", ["1e300", "-1e308", "1e7"])
def test_an_absurd_score_is_refused_by_row(small_bank, ratings_csv, tmp_path, score):
    lines = ratings_csv.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + "," + score
    shutil.copytree(ratings_csv.parent / "img", tmp_path / "img")
    (tmp_path / "r.csv").write_text("\n".join(lines) + "\n")
    r = run("learn", tmp_path / "r.csv", "--bank", small_bank.path, "--out", tmp_path / "p.profile", "--steps", "1",
            "--device", "cpu")
    assert r.exit_code == 1 and "row 4" in r.output and "nothing was learned" in r.output, r.output
    assert not (tmp_path / "p.profile").exists()


def test_a_boolean_is_not_a_score():
    from laionfilter.ratings import parse_score

    assert parse_score(7) == 7.0 and parse_score("-3.5") == -3.5
    for value in (True, False):  # a Parquet boolean column: once read as 1 and 0
        with pytest.raises(ValueError, match="not a number"):
            parse_score(value)


def test_a_calibration_that_is_not_finite_is_an_error_when_fitted_or_loaded():
    from laionfilter.calibrate import Calibration, fit_calibration

    with pytest.raises(LaionfilterError, match="cannot be fitted.*not finite"):
        fit_calibration(np.array([0.0, 1.0, 2.0]), np.array([1.7e308, 1.7e308, -1e308]))
    for bad in ({"kind": "linear", "low": 1, "high": 5, "slope": float("inf"), "intercept": 0},
                {"kind": "linear", "low": 1, "high": 5, "slope": 1, "intercept": float("nan")},
                {"kind": "isotonic", "low": 1, "high": 5, "x": [0, float("inf")], "y": [1, 2]}):
        with pytest.raises(LaionfilterError, match="malformed calibration"):
            Calibration.from_json(bad)


def test_names_are_limited_by_their_bytes_before_any_fit(small_bank, ratings_csv, tmp_path):
    assert check_name("花" * 42) and check_name("x" * 128)
    long = "é" * 128  # 128 characters, 256 bytes: over the 255 a file name may have
    table = ratings_with_users(ratings_csv, tmp_path, ["alice", long])
    r = run("learn", table, "--bank", small_bank.path, "--out", tmp_path / "profiles", "--steps", "1", "--device", "cpu")
    line = one_line_error(r)
    assert "row 3" in r.output and "bytes" in r.output and "nothing was learned" in line
    assert not list(tmp_path.rglob("*.profile"))  # not even alice's, learned before the long name failed


def test_messages_give_rows_and_encodings(small_bank, ratings_csv, tmp_path):
    table = ratings_with_users(ratings_csv, tmp_path, ["Bob", "bob", "ann"])
    r = run("learn", table, "--bank", small_bank.path, "--out", tmp_path / "p", "--steps", "1", "--device", "cpu")
    assert r.exit_code == 1 and "'Bob' (rows 2, 5, 8" in r.output and "'bob' (rows 3, 6, 9" in r.output, r.output

    utf16 = tmp_path / "utf16.csv"
    utf16.write_text(ratings_csv.read_text(), encoding="utf-16")
    r = run("learn", utf16, "--bank", small_bank.path, "--out", tmp_path / "p.profile", "--device", "cpu")
    assert r.exit_code == 1 and "UTF-16" in r.output and "UTF-8" in r.output, r.output

    lines = table.read_text().splitlines()
    lines[4] = f"{'d/' * 2100}x.png,3,ann"  # a path over PATH_MAX
    table.write_text("\n".join(lines) + "\n")
    r = run("learn", table, "--bank", small_bank.path, "--out", tmp_path / "p", "--steps", "1", "--device", "cpu")
    assert r.exit_code == 1 and "row 5" in r.output and "not a usable path" in r.output, r.output


def test_guidance_refuses_columns_that_differ_only_in_case(tmp_path):
    pq.write_table(pa.table({"key": ["a", "b"], "shard": ["s", "s"], "url": ["u", "v"], "caption": ["", ""],
                             "status": ["ok", "ok"], "bob": [1.0, 2.0], "Bob": [2.0, 1.0]}), tmp_path / "s.parquet")
    r = run("guidance", tmp_path / "s.parquet", "--out", tmp_path / "g")
    assert r.exit_code == 1 and "'bob' and 'Bob'" in r.output, r.output
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_backgrounded_rate_server_stops_on_a_signal_with_its_summary(tmp_path, sig):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(jpeg(Image.fromarray(load_photo("coffee")).resize((40, 30))))
    # A shell starts a background job with SIGINT ignored, and Python then installs no handler for it.
    proc = subprocess.Popen([sys.executable, "-m", "laionfilter", "rate", str(photos), "--out", str(tmp_path / "r.csv")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        lines = []
        while not any(line.startswith("open http") for line in lines):
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "r.csv: 0 answers" in rest, "".join(lines) + rest
