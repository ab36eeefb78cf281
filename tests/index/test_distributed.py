"""`isearch index --engine ray` on a local Ray cluster (127.0.0.1 only, 2 model actors) gives the same index,
byte for byte, as the single process; the sharded FAISS search on Ray matches one exact index.

The cluster is started once for the module by the library itself (``ray_session``), bound to loopback, and
shut down at the end; the CLI runs in a separate process and joins it with ``--address``.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray engine needs the 'scale' extra (pip install -e '.[test]')")

from instance_search.collection import Collection  # noqa: E402
from instance_search.index import faiss_backend as fb  # noqa: E402
from instance_search.index.distributed import RayExtractor, ShardedIndex, add_folder_ray, ray_session  # noqa: E402
from instance_search.index.store import IndexStore  # noqa: E402
from instance_search.recipes.base import Recipe  # noqa: E402

SIZE = 128
N_PHOTOS = 20
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),  # Ray Data's own internals
              pytest.mark.slow]  # a local Ray cluster and real photos


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", "from instance_search.cli.main import app; app()", *args],
                         capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.fixture(scope="module")
def cluster():
    with ray_session(num_cpus=2) as r:
        yield r.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def photos(ukbench, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ray-photos")
    for i in range(N_PHOTOS):
        shutil.copy(ukbench / f"ukbench{i:05d}.jpg", folder / f"ukbench{i:05d}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


@pytest.fixture(scope="module")
def whitening_file(ukbench, tmp_path_factory) -> Path:
    """PCA-whitening learned on 12 OTHER UKBench photos (so that the global vectors go through it)."""
    import torch

    tmp = tmp_path_factory.mktemp("ray-whitening")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors run one thread each: same arithmetic, same bits
    try:
        col = Collection.create(tmp / "train", Recipe("rmac", backbone="vgg16", max_size=SIZE), whitening="none")
        col.add_folder([ukbench / f"ukbench{i:05d}.jpg" for i in range(100, 112)], progress=False)
    finally:
        torch.set_num_threads(threads)
    return col.learn_whitening().save(tmp / "w.npz")


def _single(photos, root: Path, whitening) -> Collection:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if IndexStore.exists(root):
            col = Collection.open(root, writable=True)
        else:
            col = Collection.create(root, Recipe("rmac", backbone="vgg16", max_size=SIZE), whitening=whitening)
        col.add_folder(photos, progress=False)
    finally:
        torch.set_num_threads(threads)
    return col


def assert_same_index(a: Path, b: Path) -> None:
    """Same catalogue (images, settings, segments; not its creation time), same segment arrays, same compact maps,
    same whitening file."""
    sa, sb = IndexStore.open(a), IndexStore.open(b)
    ma, mb = ({k: v for k, v in s.manifest.items() if k not in ("created", "version")} for s in (sa, sb))
    assert ma == mb and sa.records() == sb.records()
    db = ("catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm", "writer.lock")
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*")  # noqa: E731
                                if p.is_file() and p.name not in db)
    assert files(a) == files(b)
    assert ma["segments"], "the index is empty"
    for seg in ma["segments"]:
        fa, fb = (s._segments[seg].npz_file for s in (sa, sb))
        za, zb = np.load(a / "segments" / fa, allow_pickle=False), np.load(b / "segments" / fb, allow_pickle=False)
        assert za.files == zb.files
        for key in za.files:
            assert np.array_equal(za[key], zb[key]), f"{seg}: {key} differs"
    for f in files(a):
        if not f.startswith("segments/"):
            assert (a / f).read_bytes() == (b / f).read_bytes(), f"{f} differs"


def test_local_cluster_is_loopback_only(cluster):
    import psutil

    assert cluster.startswith("127.0.0.1:")
    nodes = ray.nodes()
    assert nodes and all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)
    procs = psutil.Process().children(recursive=True)
    assert any("raylet" in p.name() for p in procs), "the cluster's processes should be children of this test"
    seen = 0
    for proc in procs + [psutil.Process()]:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            for addr in [c.laddr] + ([c.raddr] if c.raddr else []):
                ip = ipaddress.ip_address(addr.ip)
                ip = getattr(ip, "ipv4_mapped", None) or ip
                assert ip.is_loopback, f"{proc.name()} uses {addr.ip}:{addr.port} ({c.status})"
                seen += 1
    assert seen > 0


@pytest.fixture(scope="module")
def single_index(photos, whitening_file, tmp_path_factory) -> Path:
    """The single-process index of the photos (whitened with the held-out whitening)."""
    root = tmp_path_factory.mktemp("ray-single") / "single"
    assert len(_single(photos, root, whitening_file)) == N_PHOTOS
    return root


def test_cli_ray_index_equals_single_process(cluster, photos, whitening_file, single_index, tmp_path):
    res = _cli("index", str(photos), "--index", str(tmp_path / "ray"), "--backbone", "vgg16", "--max-size", str(SIZE),
               "--whitening", str(whitening_file), "--engine", "ray", "--address", cluster, "--workers", "2", "-q")
    assert f"{N_PHOTOS} added" in res.stdout and "1 failed" in res.stdout, res.stdout
    assert "broken.jpg" in res.stderr
    assert_same_index(single_index, tmp_path / "ray")
    assert not list((tmp_path / "ray").glob(".ray-shards-*")), "the staged shards must be cleaned up"
    # and it searches like the single-process index
    q = photos / "ukbench00005.jpg"
    hits_a = Collection.open(single_index).search(q, top=4)
    hits_b = Collection.open(tmp_path / "ray").search(q, top=4)
    assert [(h.path, h.score) for h in hits_a] == [(h.path, h.score) for h in hits_b]
    assert {Path(h.path).name for h in hits_b} == {f"ukbench{i:05d}.jpg" for i in range(4, 8)}


def test_ray_incremental_update_equals_single_process(cluster, photos, ukbench, tmp_path):
    """New, changed and unchanged files: the Ray run does the same bookkeeping (one shared add_folder)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        shutil.copy(ukbench / f"ukbench{i:05d}.jpg", folder / f"ukbench{i:05d}.jpg")
    _single(folder, tmp_path / "single", "none")
    shutil.copytree(tmp_path / "single", tmp_path / "ray")
    shutil.copy(ukbench / "ukbench00040.jpg", folder / "ukbench00002.jpg")  # changed content
    for i in (41, 42):
        shutil.copy(ukbench / f"ukbench{i:05d}.jpg", folder / f"ukbench{i:05d}.jpg")  # new
    _single(folder, tmp_path / "single", "none")
    col = Collection.open(tmp_path / "ray", writable=True)
    report = add_folder_ray(col, folder, workers=2, progress=False)
    assert len(report.added) == 2 and len(report.updated) == 1 and len(report.unchanged) == 5
    assert_same_index(tmp_path / "single", tmp_path / "ray")


def _real_vectors(index: Path) -> np.ndarray:
    """Real 512-D VGG16 conv5_3 local vectors (every stored map cell of 20 UKBench photos at 128 px), L2-normalised."""
    store = IndexStore.open(index)
    maps = store.feature_maps(store.ids())
    x = np.concatenate([m.reshape(m.shape[0], -1).T for m in maps]).astype(np.float32)
    x = x[np.linalg.norm(x, axis=1) > 0]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sharded_search_matches_one_exact_index(cluster, single_index, tmp_path):
    x = _real_vectors(single_index)
    assert len(x) > 600
    q = x[::37][:20]
    truth = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]  # the slow, obvious reference
    with ShardedIndex.build(x, shards=2, kind="flat") as idx:
        assert idx.ntotal == len(x) and idx.sizes[0] > 0 and idx.sizes[1] > 0
        scores, ids = fb.search(idx, q, 10)  # the same call as for a FAISS index
        assert np.array_equal(ids, truth)
        np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, truth, 1), rtol=1e-5, atol=1e-6)
        paths = idx.save(tmp_path / "shards")
        assert [p.name for p in paths] == ["shard-0000.faiss", "shard-0001.faiss"]
    with ShardedIndex.open(paths, mmap=True) as idx2:
        assert np.array_equal(fb.search(idx2, q, 10)[1], truth)
    np.save(tmp_path / "x.npy", x)  # each actor memory-maps the file and adds its own slice
    with ShardedIndex.build(tmp_path / "x.npy", shards=2, kind="ivfpq", nlist=4, pq_m=16, pq_bits=4) as idx3:
        assert idx3.sizes == [len(x) // 2, len(x) - len(x) // 2]
        idx3.set_search_params(nprobe=4, k_factor=8)
        assert fb.recall_at_k(idx3.search(q, 10)[1], truth) >= 0.95


def test_bad_options_are_refused_before_any_work(tmp_path, photos):
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        RayExtractor(Recipe("mac"), staging=tmp_path, engine="fast")
    with pytest.raises(ValueError, match="workers"):
        RayExtractor(Recipe("mac"), staging=tmp_path, workers=0)
    res = _cli("index", str(photos), "--index", str(tmp_path / "x"), "--engine", "ray", "--worker-engine", "fast",
               check=False)
    assert res.returncode == 2 and "unknown engine 'fast'" in res.stderr
    with pytest.raises(FileNotFoundError, match="no FAISS shard file"):
        ShardedIndex.open([tmp_path / "missing.faiss"])
