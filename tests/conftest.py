from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ISEARCH_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    os.environ.setdefault("ISEARCH_DATA", str(DATA))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"the real benchmark data is missing: {DATA} (tests read ../shared/data)")
    return DATA


@pytest.fixture(scope="session")
def ukbench(data_dir) -> Path:
    return data_dir / "ukbench1000"


@pytest.fixture(scope="session")
def paris(data_dir) -> Path:
    return data_dir / "rparis250" / "jpg"


SERVER_OBJECTS = 3


def build_server_index(ukbench: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(photos, index) of 12 UKBench photos (+ 2 views of a 4th object, not indexed), built once per session
    and shared with test_browser.py (which only reads it). No whitening: learned on 12 images it is degenerate."""
    from instance_search.collection import Collection
    from instance_search.recipes.base import Recipe

    base = tmp_path_factory.getbasetemp()
    photos, root = base / "isearch-server-photos", base / "isearch-server-index"
    if (root / "catalog.sqlite").is_file():
        return photos, root
    photos.mkdir(exist_ok=True)
    for i in range(4 * SERVER_OBJECTS + 2):
        shutil.copy(ukbench / f"ukbench{i:05d}.jpg", photos / f"ukbench{i:05d}.jpg")
    tmp = Path(tempfile.mkdtemp(dir=base, prefix="building-")) / "index"
    col = Collection.create(tmp, Recipe("rmac", backbone="vgg16", max_size=256), whitening="none")
    report = col.add_folder([photos / f"ukbench{i:05d}.jpg" for i in range(4 * SERVER_OBJECTS)], progress=False)
    assert len(report.added) == 4 * SERVER_OBJECTS and not report.failed
    try:
        tmp.rename(root)
    except OSError:
        assert (root / "catalog.sqlite").is_file()
    return photos, root


@pytest.fixture(scope="session")
def vgg_conv5(data_dir):
    """Real VGG16 conv5_3 map (post-ReLU) of an Oxford query image, max side 384 px (24 x 16 cells)."""
    from PIL import Image

    backbones = pytest.importorskip("instance_search.backbones")
    try:
        bb = backbones.load_backbone("vgg16", progress=False)
    except backbones.WeightsError as exc:  # no cached weights and no registry reachable
        pytest.skip(f"VGG16 weights unavailable: {exc}")
    img = Image.open(data_dir / "oxford5k-queries10" / "bodleian_000132.jpg").convert("RGB")
    img.thumbnail((384, 384))
    return bb.features(img, layers=["conv5_3"])[("conv5_3", 1.0)].numpy()
