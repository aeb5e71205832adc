import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from laionfilter import writer as writer_module
from laionfilter.cli import cli
from laionfilter.errors import LaionfilterError
from laionfilter.images import Preprocessor
from laionfilter.profile import load_profile
from laionfilter.score import ScoreConfig, score_shards

from .helpers import good_samples, write_shard


def read_scores(out: Path):
    files = sorted(out.glob("*.parquet"))
    return pq.read_table(files).to_pylist() if files else []


def direct_scores(profile_path, bank, data: list[bytes]) -> np.ndarray:
    model = load_profile(profile_path).model(bank)
    pre = Preprocessor(bank.architecture.preprocess)
    with torch.no_grad():
        return model(torch.stack([pre(d) for d in data])).numpy()


def test_two_workers_score_each_sample_once_and_match_the_direct_forward(shards, profiles, small_bank, tmp_path):
    out = tmp_path / "scores.parquet"
    s = score_shards(str(shards), profiles, out, bank=small_bank, progress=False,
                     cfg=ScoreConfig(workers=2, batch_size=4, device="cpu", precision="fp32"))
    assert (s["done"], s["failed"], s["samples"], s["scored"]) == (3, 0, 21, 21)
    rows = read_scores(out)
    keys = [r["key"] for r in rows]
    assert sorted(keys) == sorted(f"{s:05d}{i:04d}" for s in range(3) for i in range(7))
    assert all(r["status"] == "ok" and r["caption"] == f"photo {r['key']}" and r["url"].endswith(f"{r['key']}.jpg")
               for r in rows)
    by_key = {r["key"]: r for r in rows}
    samples = good_samples("00001", 7, seed=1)
    for prof, col in zip(profiles, ("alice", "bob")):
        expect = direct_scores(prof, small_bank, [x["jpg"] for x in samples])
        got = np.array([by_key[x["__key__"]][col] for x in samples])
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    for name in ("00000", "00001", "00002"):
        stats = json.loads((out / f"{name}_stats.json").read_text())
        assert stats["status"] == "done" and stats["samples"] == 7
    manifest = json.loads((out / "_manifest.json").read_text())
    assert [p["name"] for p in manifest["profiles"]] == ["alice", "bob"]
    assert manifest["bank"]["fingerprint"] == small_bank.fingerprint
    # DuckDB reads the folder with a glob
    import duckdb

    n = duckdb.sql(f"SELECT count(*) AS n, count(DISTINCT key) AS k FROM read_parquet('{out}/*.parquet')").fetchall()
    assert n == [(21, 21)]


def test_images_per_cpu_forward_follow_the_architecture_and_leave_scores_alone(shards, profiles, small_bank, tmp_path):
    import open_clip

    from laionfilter.model import Architecture
    from laionfilter.scorer import MergedModels, cpu_chunk_for

    def vit(name):
        return Architecture(name, open_clip.get_model_config(name), {})

    # the tiny ViT's activations are small: the cap; ViT-B-16 and ViT-L-14 keep one forward near 20 MiB
    assert [cpu_chunk_for(a) for a in (small_bank.architecture, vit("ViT-B-16"), vit("ViT-L-14"))] == [32, 8, 4]
    named = [(c, load_profile(p)) for c, p in zip(("alice", "bob"), profiles)]
    assert MergedModels(named, small_bank, torch.device("cpu")).chunk == 32
    assert MergedModels(named, small_bank, torch.device("cpu"), cpu_chunk=3).chunk == 3
    rows = {}
    for chunk in (None, 3):
        out = tmp_path / f"chunk-{chunk}"
        score_shards(str(shards), profiles, out, bank=small_bank,
                     cfg=ScoreConfig(workers=0, batch_size=7, device="cpu", cpu_chunk=chunk), progress=False)
        rows[chunk] = {r["key"]: (r["alice"], r["bob"]) for r in read_scores(out)}
    assert rows[None].keys() == rows[3].keys() and len(rows[3]) == 21
    for key, (a, b) in rows[3].items():
        assert rows[None][key] == pytest.approx((a, b), abs=1e-5)


def test_bad_samples_and_broken_shards_get_rows_and_the_run_goes_on(profiles, small_bank, tmp_path):
    src = tmp_path / "shards"
    src.mkdir()
    good = good_samples("a", 4, seed=5)
    corrupt = dict(good_samples("b", 1, seed=6)[0], __key__="bad-jpeg")
    corrupt["jpg"] = corrupt["jpg"][: len(corrupt["jpg"]) // 3]  # truncated JPEG data
    junk = dict(good_samples("c", 1, seed=7)[0], __key__="not-an-image")
    junk["jpg"] = b"this is text, not a JPEG"
    no_image = {"__key__": "no-image", "json": json.dumps({"url": "https://example.com/x.jpg", "caption": "lost"}).encode(),
                "txt": b"lost"}
    write_shard(src / "mixed.tar", good[:2] + [corrupt, no_image, junk] + good[2:])
    write_shard(src / "empty.tar", [])
    whole = write_shard(tmp_path / "whole.tar", good_samples("t", 8, seed=8))
    data = whole.read_bytes()
    (src / "truncated.tar").write_bytes(data[: int(len(data) * 0.6)])
    out = tmp_path / "scores"
    r = CliRunner().invoke(cli, ["score", str(src), "--profile", str(profiles[0]), "--bank", str(small_bank.path),
                                 "--out", str(out), "--workers", "2", "--batch-size", "3", "--device", "cpu"])
    assert r.exit_code == 1, r.output
    assert "2 shard(s) done, 1 failed" in r.output and "truncated.tar" in r.output
    rows = {x["key"]: x for x in read_scores(out)}
    assert rows["bad-jpeg"]["status"] == "corrupt" and rows["bad-jpeg"]["alice"] is None and rows["bad-jpeg"]["error"]
    assert rows["not-an-image"]["status"] == "unsupported"
    assert rows["no-image"]["status"] == "no_image" and rows["no-image"]["caption"] == "lost"
    assert all(rows[f"a{i:04d}"]["status"] == "ok" and rows[f"a{i:04d}"]["alice"] is not None for i in range(4))
    truncated = [k for k, x in rows.items() if x["shard"] == "truncated"]
    assert 0 < len(truncated) < 8  # the rows it produced are kept
    assert json.loads((out / "truncated_stats.json").read_text())["status"] == "failed"
    assert json.loads((out / "empty_stats.json").read_text())["samples"] == 0
    # The failed shard is retried by the next run; the done ones are skipped.
    r = CliRunner().invoke(cli, ["score", str(src), "--profile", str(profiles[0]), "--bank", str(small_bank.path),
                                 "--out", str(out), "--workers", "0", "--device", "cpu"])
    assert "1 failed, 2 skipped" in r.output


def test_killed_run_resumes_to_the_same_result(shards, profiles, small_bank, tmp_path, monkeypatch):
    cfg = ScoreConfig(workers=0, batch_size=5, device="cpu")
    whole = tmp_path / "whole"
    score_shards(str(shards), profiles, whole, bank=small_bank, cfg=cfg, progress=False)
    real_finish = writer_module.ShardRows.finish
    finished = []

    def finish_then_die(self, *a, **k):
        real_finish(self, *a, **k)
        finished.append(self.name)
        raise KeyboardInterrupt  # killed right after the first shard was written

    out = tmp_path / "resumed"
    monkeypatch.setattr(writer_module.ShardRows, "finish", finish_then_die)
    with pytest.raises(KeyboardInterrupt):
        score_shards(str(shards), profiles, out, bank=small_bank, cfg=cfg, progress=False)
    monkeypatch.setattr(writer_module.ShardRows, "finish", real_finish)
    assert len(finished) == 1 and len(list(out.glob("*_stats.json"))) == 1
    s = score_shards(str(shards), profiles, out, bank=small_bank, cfg=cfg, progress=False)
    assert (s["skipped"], s["done"]) == (1, 2)
    a = sorted(read_scores(whole), key=lambda r: r["key"])
    b = sorted(read_scores(out), key=lambda r: r["key"])
    assert [r["key"] for r in b] == sorted({r["key"] for r in b}) and len(b) == 21
    assert a == b


def test_a_profile_from_another_bank_is_refused_before_any_work(shards, profiles, tasks, tmp_path):
    from laionfilter.bank import build_bank

    other = build_bank(tasks[:2], tmp_path / "other-bank")
    out = tmp_path / "scores"
    with pytest.raises(LaionfilterError, match="was learned on bank"):
        score_shards(str(shards), profiles, out, bank=other, cfg=ScoreConfig(workers=0, device="cpu"), progress=False)
    assert not out.exists()


def test_rank_split_covers_every_shard_once(shards, profiles, small_bank, tmp_path):
    out = tmp_path / "ranked"
    for rank in range(2):
        score_shards(str(shards), profiles[:1], out, bank=small_bank,
                     cfg=ScoreConfig(workers=0, device="cpu", rank=rank, world_size=2), progress=False)
    keys = [r["key"] for r in read_scores(out)]
    assert len(keys) == 21 == len(set(keys))


def test_other_manifest_is_refused_without_overwrite(shards, profiles, small_bank, tmp_path):
    out = tmp_path / "s"
    cfg = ScoreConfig(workers=0, device="cpu")
    score_shards(str(shards), profiles[:1], out, bank=small_bank, cfg=cfg, progress=False)
    with pytest.raises(LaionfilterError, match="other profiles"):
        score_shards(str(shards), profiles, out, bank=small_bank, cfg=cfg, progress=False)


def test_missing_gpu_is_a_clear_error(shards, profiles, small_bank, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(LaionfilterError, match="no CUDA GPU"):
        score_shards(str(shards), profiles, tmp_path / "s", bank=small_bank, cfg=ScoreConfig(device="cuda"), progress=False)


def test_shard_specs(shards, tmp_path):
    from laionfilter.shards import expand_shards

    three = [str(shards / f"{i:05d}.tar") for i in range(3)]
    assert expand_shards(str(shards)) == three
    assert expand_shards(str(shards / "{00000..00002}.tar")) == three
    assert expand_shards(str(shards / "*.tar")) == three
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(three) + "\n# a comment\n")
    assert expand_shards(str(lst)) == three
    assert expand_shards("pipe:cat /x/{0..1}.tar", allow_pipe=True) == ["pipe:cat /x/0.tar", "pipe:cat /x/1.tar"]
    with pytest.raises(LaionfilterError, match="no such shard"):
        expand_shards(str(shards / "{00000..00004}.tar"))


def test_pipe_urls_are_read(shards, profiles, small_bank, tmp_path):
    out = tmp_path / "piped"
    s = score_shards(f"pipe:cat {shards}/{{00000..00001}}.tar", profiles[:1], out, bank=small_bank,
                     cfg=ScoreConfig(workers=0, device="cpu", allow_pipe=True), progress=False)
    assert s["scored"] == 14 and sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]


def test_img2dataset_shards(fetched, profiles, small_bank, tmp_path):
    subset, shards, _ = fetched  # written by img2dataset: its key, url, caption and size in each sample's json
    out = tmp_path / "scores"
    s = score_shards(str(shards), profiles[:1], out, bank=small_bank, cfg=ScoreConfig(workers=2, device="cpu"),
                     progress=False)
    rows = read_scores(out)
    assert s["scored"] == 6 and len({r["key"] for r in rows}) == 6
    assert sorted(r["caption"] for r in rows) == sorted(x["caption"] for x in subset)
    assert sorted(r["url"] for r in rows) == sorted(x["url"] for x in subset)
    assert all(r["width"] == 96 for r in rows)


def test_ratings_may_name_sample_keys_in_shards(shards, small_bank, tmp_path):
    from laionfilter.model import eval_transform
    from laionfilter.ratings import read_ratings

    keys = [f"00000{i:04d}" for i in range(7)] + [f"00002{i:04d}" for i in range(5)]
    ratings = tmp_path / "r.csv"
    ratings.write_text("image,score\n" + "\n".join(f"{k},{i % 5 + 1}" for i, k in enumerate(keys)) + "\n")
    [sup] = read_ratings(ratings, eval_transform(small_bank.architecture), shards=str(shards)).supports
    assert sup.images == keys and len(sup.pixels) == 12
    pre = Preprocessor(small_bank.architecture.preprocess)
    first = good_samples("00000", 7, seed=0)[0]
    assert torch.equal(sup.pixels[0], pre(first["jpg"]))
    ratings.write_text("image,score\n00000000,3\nnot-a-key,4\n")
    with pytest.raises(LaionfilterError, match="row 3: sample key 'not-a-key' not found"):
        read_ratings(ratings, eval_transform(small_bank.architecture), shards=str(shards))


# Decoding and precision ------------------------------------------------------------------------------

def test_bf16_is_chosen_where_the_processor_has_it():
    from laionfilter.devices import cpu_has_bf16, resolve_precision

    cpu = torch.device("cpu")
    assert cpu_has_bf16("flags : fpu avx512f avx512_bf16 avx512_vnni") and cpu_has_bf16("flags : amx_bf16 amx_tile")
    assert not cpu_has_bf16("flags : fpu avx2 avx512f avx512_vnni") and not cpu_has_bf16("")
    assert resolve_precision("fp32", cpu) == torch.float32 and resolve_precision("bf16", cpu) == torch.bfloat16
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    with pytest.raises(LaionfilterError, match="precision"):
        resolve_precision("fp16", cpu)


@pytest.mark.parametrize("tune", ["all", "head"])  # whole merged models, and heads on one shared trunk
def test_bf16_weights_rank_as_fp32_does(shards, small_bank, ratings_csv, tmp_path, tune):
    from laionfilter.profile import learn_profiles
    from laionfilter.recipe import LearnConfig
    from laionfilter.scorer import MergedModels
    from laionfilter.metrics import srocc

    profs = [learn_profiles(ratings_csv, small_bank, tmp_path / f"{n}.profile",
                            LearnConfig(steps=3, device="cpu", tune=tune, init=init), progress=False)[0].path
             for n, init in (("a", "adaptive"), ("b", "uniform"))]
    got = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        score_shards(str(shards), profs, out, bank=small_bank, progress=False,
                     cfg=ScoreConfig(workers=0, batch_size=8, device="cpu", precision=precision))
        got[precision] = {r["key"]: (r["a"], r["b"]) for r in read_scores(out)}
    keys = sorted(got["fp32"])
    assert keys == sorted(got["bf16"])
    for j in range(2):
        a, b = (np.array([got[p][k][j] for k in keys]) for p in ("fp32", "bf16"))
        assert srocc(a, b) > 0.98 and np.abs(a - b).max() < 0.05 * np.ptp(a)
        assert np.any(a != b)  # it did run in bf16
    loaded = [(p.stem, load_profile(p)) for p in profs]
    models = MergedModels(loaded, small_bank, torch.device("cpu"), precision="bf16")
    for _, _, model, _ in models.groups:
        assert model.visual.conv1.weight.dtype == torch.bfloat16 and model.head[0].weight.dtype == torch.float32


@pytest.fixture(scope="module")
def big_jpegs(tmp_path_factory):
    """A shard of JPEGs far larger than the starter bank's 64-pixel input, a PNG, and a JPEG whose
    header reads but whose data is cut short."""
    from PIL import Image

    from .helpers import crops, jpeg

    samples = []
    for i, img in enumerate(crops(6, seed=60)):
        big = img.resize((300 + 40 * i, 260 + 20 * i))
        samples.append({"__key__": f"big{i}", "jpg": jpeg(big)})
    samples.append({"__key__": "cmyk", "jpg": jpeg(crops(1, seed=61)[0].resize((300, 280)).convert("CMYK"))})
    import io

    buf = io.BytesIO()
    crops(1, seed=62)[0].resize((280, 280)).save(buf, "PNG")
    samples.append({"__key__": "png", "png": buf.getvalue()})
    whole = jpeg(crops(1, seed=63)[0].resize((400, 300)))
    samples.append({"__key__": "cut", "jpg": whole[: len(whole) // 2]})
    assert Image.open(io.BytesIO(whole[: len(whole) // 2])).size == (400, 300)
    return write_shard(tmp_path_factory.mktemp("big") / "big.tar", samples)


def test_scaled_decoding_keeps_every_row_and_the_ranking(big_jpegs, profiles, small_bank, tmp_path):
    from laionfilter.metrics import srocc

    rows = {}
    for decode in ("full", "scaled"):
        out = tmp_path / decode
        score_shards(str(big_jpegs), profiles[:1], out, bank=small_bank, progress=False,
                     cfg=ScoreConfig(workers=0, batch_size=4, device="cpu", precision="fp32", decode=decode))
        rows[decode] = {r["key"]: r for r in read_scores(out)}
    full, scaled = rows["full"], rows["scaled"]
    assert full.keys() == scaled.keys()
    for k in full:  # the image's own size and status, whatever scale it was decoded at
        assert (full[k]["width"], full[k]["height"], full[k]["status"]) == (scaled[k]["width"], scaled[k]["height"],
                                                                          scaled[k]["status"]), k
    assert full["big5"]["width"] == 500 and full["cut"]["status"] == "corrupt"
    ok = [k for k in full if full[k]["status"] == "ok"]
    a, b = (np.array([r[k]["alice"] for k in ok]) for r in (full, scaled))
    assert len(ok) == 8 and srocc(a, b) > 0.95 and np.abs(a - b).max() < 0.1 * np.ptp(a)
    assert np.any(a != b)  # the large JPEGs were decoded at another scale


def test_jpegs_left_for_the_gpu_decode_there_or_fall_back_by_row(big_jpegs, small_bank):
    """The --decode gpu path, run on the CPU: JPEGs cross as bytes, the rest as pixels, and the batch the
    model sees is the CPU path's; a JPEG the batched decoder refuses is decoded alone or gets its status."""
    from laionfilter.mapper import decode_on_device, shard_batches

    pre = Preprocessor(small_bank.architecture.preprocess, scaled_decode=False)
    [cpu_batch, _] = list(shard_batches(str(big_jpegs), pre, 16))
    [left, _] = list(shard_batches(str(big_jpegs), pre, 16, gpu_jpeg=True))
    assert left.index == [6, 7] and left.jpeg_rows == [0, 1, 2, 3, 4, 5, 8]  # CMYK and PNG decoded in the worker
    done = decode_on_device(left, pre, torch.device("cpu"))  # the cut JPEG fails the batched call
    assert done.index == cpu_batch.index == [0, 1, 2, 3, 4, 5, 6, 7]
    assert done.rows == cpu_batch.rows and done.rows[8]["status"] == "corrupt" and done.pixels.dtype == torch.uint8
    assert torch.equal(done.pixels, cpu_batch.pixels)
    whole = [s for s in shard_batches(str(big_jpegs), pre, 6, gpu_jpeg=True)][0]  # six good JPEGs, one call
    assert torch.equal(decode_on_device(whole, pre, torch.device("cpu")).pixels, cpu_batch.pixels[:6])


def test_decode_options_are_checked_before_any_work(shards, profiles, small_bank, tmp_path):
    r = CliRunner().invoke(cli, ["score", str(shards), "--profile", str(profiles[0]), "--bank", str(small_bank.path),
                                 "--out", str(tmp_path / "s"), "--device", "cpu", "--decode", "gpu"])
    assert r.exit_code == 1 and "--decode gpu needs a CUDA device" in r.output and not (tmp_path / "s").exists()


# One's own images ----------------------------------------------------------------------------------------

@pytest.fixture
def photo_folder(tmp_path):
    """Nine JPEGs and a PNG in a folder and a subfolder, and a file that is not an image."""
    from .helpers import crops, jpeg

    root = tmp_path / "photos"
    (root / "trip").mkdir(parents=True)
    for i, img in enumerate(crops(10, seed=70)):
        if i == 9:
            img.save(root / "trip" / "last.png")
        else:
            (root / ("trip" if i % 3 == 0 else ".") / f"{i:02d}.jpg").write_bytes(jpeg(img))
    (root / "notes.txt").write_text("not an image")
    return root


def test_a_folder_of_images_is_scored_in_place_and_resumed(photo_folder, profiles, small_bank, tmp_path, monkeypatch):
    from laionfilter import shards

    monkeypatch.setattr(shards, "CHUNK", 4)  # three parts of at most four images
    out = tmp_path / "scores"
    r = CliRunner().invoke(cli, ["score", str(photo_folder), "--profile", str(profiles[0]), "--bank",
                                 str(small_bank.path), "--out", str(out), "--device", "cpu", "--workers", "0"])
    assert r.exit_code == 0, r.output
    rows = read_scores(out)
    want = sorted(["01.jpg", "02.jpg", "04.jpg", "05.jpg", "07.jpg", "08.jpg", "trip/00.jpg", "trip/03.jpg",
                   "trip/06.jpg", "trip/last.png"])
    assert sorted(r["key"] for r in rows) == want
    assert all(r["status"] == "ok" and r["alice"] is not None and r["width"] > 0 for r in rows)
    assert sorted(p.name for p in out.glob("*.parquet")) == ["images-00000.parquet", "images-00001.parquet",
                                                             "images-00002.parquet"]
    assert not list(out.rglob("*.jpg"))  # nothing copied
    direct = direct_scores(profiles[0], small_bank, [(photo_folder / k).read_bytes() for k in want])
    got = {r["key"]: r["alice"] for r in rows}
    np.testing.assert_allclose([got[k] for k in want], direct, rtol=0.05, atol=0.05)  # bf16 by default here
    r = CliRunner().invoke(cli, ["score", str(photo_folder), "--profile", str(profiles[0]), "--bank",
                                 str(small_bank.path), "--out", str(out), "--device", "cpu", "--workers", "0", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] == 3
    (photo_folder / "new.jpg").write_bytes((photo_folder / "01.jpg").read_bytes())  # the folder changed
    r = CliRunner().invoke(cli, ["score", str(photo_folder), "--profile", str(profiles[0]), "--bank",
                                 str(small_bank.path), "--out", str(out), "--device", "cpu", "--workers", "0"])
    assert r.exit_code == 1 and "images" in r.output and "--overwrite" in r.output


def test_globs_and_lists_of_images_are_keyed_relative_to_their_folder(photo_folder, tmp_path, monkeypatch):
    from laionfilter.reader import ImageChunk
    from laionfilter.shards import expand_sources

    [chunk] = expand_sources(str(photo_folder / "trip" / "*.jpg"))
    assert isinstance(chunk, ImageChunk) and chunk.files == ("00.jpg", "03.jpg", "06.jpg")
    [chunk] = expand_sources(str(photo_folder / "**" / "*.png"))
    assert chunk.root == str(photo_folder) and chunk.files == ("trip/last.png",)
    lst = photo_folder / "pick.txt"
    lst.write_text("01.jpg\ntrip/03.jpg\n# a comment\n")
    [chunk] = expand_sources(str(lst))
    assert chunk.root == str(photo_folder) and chunk.files == ("01.jpg", "trip/03.jpg")
    lst.write_text("01.jpg\nmissing.jpg\n")
    with pytest.raises(LaionfilterError, match="missing.jpg: no such image"):
        expand_sources(str(lst))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LaionfilterError, match="no .tar shards and no images"):
        expand_sources(str(empty))


def test_an_image_file_that_cannot_be_read_gets_its_row(photo_folder, small_bank):
    from laionfilter.mapper import Batch, shard_batches
    from laionfilter.reader import ImageChunk

    chunk = ImageChunk("images-00000", str(photo_folder), ("01.jpg", "gone.jpg", "notes.txt"))
    [batch, done] = list(shard_batches(chunk, Preprocessor(small_bank.architecture.preprocess), 8))
    assert isinstance(batch, Batch) and batch.index == [0] and done.error is None
    assert batch.rows[1]["status"] == "unreadable" and "No such file" in batch.rows[1]["error"]
    assert batch.rows[2]["status"] == "no_image"
