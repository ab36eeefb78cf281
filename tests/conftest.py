from __future__ import annotations

import contextlib
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_index(root: Path, images: int, lifetime_s: int, log_path: Path, *, cwd: Path | None = None,
                 log_level: str = "warning", env: dict | None = None, start_timeout_s: float = 90):
    """``serve(root)`` in a subprocess on 127.0.0.1 (killed by ``timeout`` after ``lifetime_s`` whatever
    happens); yields ``(port, proc)`` once ``/api/stats`` answers with ``images`` images, stops it on exit."""
    import json
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    code = ("import sys; from instance_search.server import serve; "
            "serve(sys.argv[1], host='127.0.0.1', port=int(sys.argv[2]), ground_truth='ukbench', "
            f"log_level={log_level!r})")
    log = open(log_path, "wb")
    proc = subprocess.Popen(["timeout", "-k", "5", str(lifetime_s), sys.executable, "-c", code, str(root), str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=2) as r:
                    assert json.load(r)["images"] == images
                break
            except (OSError, ValueError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"the server did not start: {Path(log_path).read_text()[-2000:]}")
                time.sleep(0.3)
        yield port, proc
    finally:
        proc.terminate()  # timeout forwards SIGTERM to the server
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


@pytest.fixture(scope="session")
def vgg_compact_crops(vgg_conv5):
    """Compact-coded crops of the real VGG16 conv5_3 map above (three sizes, flipped copies) and a query MAC from
    one of its regions: ``(SparseMap list, q)``, as AML re-ranking reads an index's maps."""
    import numpy as np

    from instance_search.index.compact import decode_sparse, encode_map
    from instance_search.ops.integral import exact_window_max

    V = vgg_conv5.astype(np.float32)
    maps = [V, V[:, :, ::-1].copy(), V[:, 2:, 1:], V[:, 3:20, :14], V[:, ::-1].copy()]
    return [decode_sparse(encode_map(m)) for m in maps], exact_window_max(V, [(3, 4, 7, 6)])[0]
