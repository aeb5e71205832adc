import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Under pytest-xdist (`-n auto`, the README's command) there is one worker process per core: torch's
# default of one thread per core in each, and in the CLI processes tests start, would oversubscribe the
# cores many times over (docs/research-log.md, "Threads").
# Likewise learn, suggest and evaluate would run their fits in a process per core (LAIONFILTER_JOBS):
# beside the other workers, one at a time, unless a test asks for more.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["LAIONFILTER_JOBS"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The package (and with it torch and open_clip, seconds to import) is imported inside the fixtures: under
# pytest-xdist the controller process loads this file too, and it runs no test.
TINY = "lf-tiny-vit"


@pytest.fixture(scope="session")
def databases(tmp_path_factory) -> dict[str, Path]:
    """Small real-photo databases (sharpness, noise, colourfulness) written by the starter's generator."""
    from laionfilter.train.starter import StarterConfig, make_database

    root = tmp_path_factory.mktemp("databases")
    small = StarterConfig(train_crops=96, val_crops=48)
    return {c: make_database(c, root, small, 64) for c in ("sharpness", "noise", "colourfulness")}


def quick_config(database: Path, name: str, **kw):
    """A FinetuneConfig of 20 head and 20 backbone steps on the tiny ViT, on the CPU."""
    from laionfilter.train.finetune import FinetuneConfig, StageConfig

    base = dict(database=str(database), base=TINY, name=name, device="cpu", workers=0, checkpoint_every=0,
                head=StageConfig(20, 32, 3e-3, 3e-4), backbone=StageConfig(20, 16, 1e-3, 1e-4), val_batch_size=64)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture(scope="session")
def tasks(tmp_path_factory, databases) -> list[Path]:
    """Three task checkpoints fine-tuned briefly from one random tiny base."""
    from laionfilter.train.finetune import finetune

    root = tmp_path_factory.mktemp("tasks")
    out = []
    for name, db in databases.items():
        path = root / f"{name}.safetensors"
        finetune(quick_config(db, name), path, progress=False)
        out.append(path)
    return out


@pytest.fixture(scope="session")
def small_bank(tasks, tmp_path_factory):
    from laionfilter.bank import build_bank

    return build_bank(tasks, tmp_path_factory.mktemp("small-bank") / "bank", dtype="float16")


@pytest.fixture(scope="session")
def ratings_csv(databases, tmp_path_factory) -> Path:
    """24 real-photo crops rated by how sharp they are (relative paths, as a user would write them)."""
    import csv
    import shutil

    root = tmp_path_factory.mktemp("ratings")
    (root / "img").mkdir()
    with open(databases["sharpness"]) as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"][:24]
    lines = ["image,score"]
    for i, r in enumerate(rows):
        shutil.copy(databases["sharpness"].parent / r["image"], root / "img" / f"{i:02d}.png")
        lines.append(f"img/{i:02d}.png,{round(float(r['score']))}")
    (root / "ratings.csv").write_text("\n".join(lines) + "\n")
    return root / "ratings.csv"


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Three good shards (7 real-photo JPEGs each) written by webdataset's TarWriter."""
    from .helpers import good_samples, write_shard

    root = tmp_path_factory.mktemp("shards")
    for s in range(3):
        write_shard(root / f"{s:05d}.tar", good_samples(f"{s:05d}", 7, seed=s))
    return root


@pytest.fixture(scope="session")
def profiles(small_bank, ratings_csv, tmp_path_factory) -> list[Path]:
    """alice.profile and bob.profile, learned briefly on the small bank."""
    from laionfilter.recipe import LearnConfig
    from laionfilter.profile import learn_profiles

    root = tmp_path_factory.mktemp("profiles")
    a = learn_profiles(ratings_csv, small_bank, root / "alice.profile", LearnConfig(steps=3, device="cpu"), progress=False)[0].path
    b = learn_profiles(ratings_csv, small_bank, root / "bob.profile", LearnConfig(steps=3, device="cpu", init="uniform"),
                       progress=False)[0].path
    return [a, b]


@pytest.fixture
def users_table(tmp_path, ratings_csv) -> Path:
    """Two users of opposite taste (ann, bob) over the 24 rated images."""
    import shutil

    shutil.copytree(ratings_csv.parent / "img", tmp_path / "img")
    lines = ratings_csv.read_text().splitlines()[1:]
    rows = ["user,image,score"]
    for line in lines:
        img, score = line.split(",")
        rows.append(f"ann,{img},{score}")
        rows.append(f"bob,{img},{11 - int(score)}")  # the opposite taste
    (tmp_path / "users.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "users.csv"


@pytest.fixture(scope="session")
def fetched(tmp_path_factory):
    """Six local JPEGs fetched by ``laionfilter fetch`` (img2dataset on file:// urls): the subset's rows,
    the output folder and the command's result. One download shared by the tests that read it, since
    img2dataset's spawned worker takes seconds to import."""
    pytest.importorskip("img2dataset")
    import pyarrow as pa
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from laionfilter.cli import cli

    from .helpers import crops, jpeg

    root = tmp_path_factory.mktemp("fetched")
    rows = []
    for i, img in enumerate(crops(6, seed=30)):
        p = root / f"{i}.jpg"
        p.write_bytes(jpeg(img))
        rows.append({"url": f"file://{p}", "caption": f"cap {i}", "key": str(i), "shard": "x", "score": 1.0})
    pq.write_table(pa.Table.from_pylist(rows), root / "subset.parquet")
    r = CliRunner().invoke(cli, ["fetch", str(root / "subset.parquet"), "--out", str(root / "dl"), "--image-size", "96",
                                 "--download-threads", "2"])
    return rows, root / "dl", r


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Selenium (Debian's chromium and chromium-driver)."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them where apt-get can)")
    webdriver = pytest.importorskip("selenium.webdriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()
