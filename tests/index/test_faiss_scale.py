"""FAISS backends at small scale on real CNN vectors: exact search equals a numpy loop, IVF-PQ and HNSW recall
against it, the speed/recall knobs, and saved indexes opened memory-mapped."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from instance_search.index import faiss_backend as fb

pytestmark = pytest.mark.slow  # its module fixture alone takes seconds (pytest --durations)

K = 10


@pytest.fixture(scope="module")
def real(ukbench):
    """Real 512-D vectors: every conv4_3 cell of 9 UKBench photos (9 objects) at 224 px, L2-normalised;
    the 9th photo's cells are the queries (held out of the database)."""
    import torch

    from instance_search.backbones import load_backbone
    from instance_search.images import load_image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bb = load_backbone("vgg16")
        per = []
        for i in range(0, 36, 4):
            img = load_image(ukbench / f"ukbench{i:05d}.jpg", max_size=224)
            fmap = bb.features(img, layers=["conv4_3"])[("conv4_3", 1.0)].numpy()
            x = fmap.reshape(fmap.shape[0], -1).T
            per.append(x[np.linalg.norm(x, axis=1) > 0])
    finally:
        torch.set_num_threads(threads)
    norm = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    db, queries = norm(np.concatenate(per[:-1])), norm(per[-1][::3][:100])
    return db, queries


def exact_topk(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The slow, obvious reference: every inner product, one query at a time, fully sorted."""
    ids, scores = [], []
    for row in q:
        s = np.array([float(np.dot(row.astype(np.float64), v.astype(np.float64))) for v in db])
        order = np.argsort(-s, kind="stable")[:k]
        ids.append(order)
        scores.append(s[order])
    return np.asarray(scores), np.asarray(ids)


@pytest.fixture(scope="module")
def truth(real):
    db, q = real
    return exact_topk(db, q, K)


def test_flat_equals_the_reference(real, truth):
    db, q = real
    assert len(db) > 4000 and db.shape[1] == 512
    scores, ids = fb.search(fb.build_faiss(db, "flat"), q, K)
    assert np.array_equal(ids, truth[1])
    np.testing.assert_allclose(scores, truth[0], rtol=1e-5, atol=1e-5)


def test_recall_at_k_counts_overlap():
    assert fb.recall_at_k(np.array([[1, 2, 3], [4, 5, -1]]), np.array([[3, 2, 9], [4, 6, 7]])) == pytest.approx(
        (2 / 3 + 1 / 3) / 2)
    with pytest.raises(ValueError, match="rows"):
        fb.recall_at_k(np.zeros((2, 3)), np.zeros((3, 3)))


def test_ivfpq_recall_and_knobs(real, truth):
    db, q = real
    idx = fb.build_faiss(db, "ivfpq", nlist=32, pq_m=32, pq_bits=6, train_sample=2600)
    assert idx.ntotal == len(db)
    recall = {}
    for nprobe in (1, 32):
        fb.set_search_params(idx, nprobe=nprobe, k_factor=16)
        recall[nprobe] = fb.recall_at_k(fb.search(idx, q, K)[1], truth[1])
    assert recall[32] >= 0.95, recall
    assert recall[1] < recall[32], recall
    raw = fb.build_faiss(db, "ivfpq", nlist=32, pq_m=32, pq_bits=6, train_sample=2600, refine=False)
    fb.set_search_params(raw, nprobe=32)
    assert fb.recall_at_k(fb.search(raw, q, K)[1], truth[1]) < recall[32]  # the exact re-scoring matters
    with pytest.raises(ValueError, match="ef_search applies to hnsw"):
        fb.set_search_params(idx, ef_search=64)
    with pytest.raises(ValueError, match="needs at least 2496 vectors"):
        fb.build_faiss(db, "ivfpq", nlist=32, pq_m=32, pq_bits=6, train_sample=1000)


def test_hnsw_recall(real, truth):
    db, q = real
    idx = fb.build_faiss(db, "hnsw")
    assert fb.recall_at_k(fb.search(idx, q, K)[1], truth[1]) >= 0.95
    with pytest.raises(ValueError, match="nprobe applies to ivfpq"):
        fb.set_search_params(idx, nprobe=4)


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_saved_index_opens_memory_mapped(real, kind, tmp_path):
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc (Linux) to see the mapping")
    db, q = real
    idx = fb.build_faiss(db, kind, nlist=32, pq_m=32, pq_bits=6)
    path = fb.save_faiss(idx, tmp_path / f"{kind}.faiss")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{kind}.faiss"]  # no temporary file left
    want = fb.search(idx, q, K)
    m = fb.load_faiss(path)
    assert _mapped(path.resolve()), "the index file should be memory-mapped"
    got = fb.search(m, q, K)
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
    inmem = fb.load_faiss(path, mmap=False)
    assert np.array_equal(fb.search(inmem, q, K)[1], want[1])
    fb.save_faiss(fb.build_faiss(db[:100], "flat"), path)  # replacing is atomic too
    assert fb.load_faiss(path).ntotal == 100 and m.ntotal == len(db)


_RSS_GROWTH = """
import sys, psutil, faiss  # faiss loaded before the first reading
from instance_search.index import faiss_backend as fb
proc = psutil.Process()
rss0 = proc.memory_info().rss
idx = fb.load_faiss(sys.argv[1], mmap=sys.argv[2] == "mmap")
print(idx.ntotal, proc.memory_info().rss - rss0)
"""


def _rss_growth(path, mode: str) -> tuple[int, int]:
    """(vectors, RSS growth in bytes) of opening ``path`` in a fresh interpreter: in this process, memory freed
    by earlier tests can be reused by the allocator and hide a copy (CI once saw a growth of 0 here)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _RSS_GROWTH, str(path), mode], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return int(out[0]), int(out[1])


def test_memory_mapped_open_does_not_copy(real, tmp_path):
    db, _ = real
    big = np.tile(db, (12, 1))  # ~100 MB of real vectors
    path = fb.save_faiss(fb.build_faiss(big, "flat"), tmp_path / "big.faiss")
    size = path.stat().st_size
    n_mmap, grew_mmap = _rss_growth(path, "mmap")
    n_copy, grew_copy = _rss_growth(path, "copy")
    assert n_mmap == n_copy == len(big)
    assert grew_copy > 0.8 * size, (grew_copy, size)
    assert grew_mmap < 0.1 * size, (grew_mmap, size)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.faiss"):
        fb.load_faiss(tmp_path / "nothing.faiss")
    bad = tmp_path / "bad.faiss"
    bad.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="bad.faiss: not a readable FAISS index"):
        fb.load_faiss(bad)
    with pytest.raises(ValueError, match="unknown FAISS index kind"):
        fb.build_faiss(np.zeros((4, 8), np.float32), "lsh")
