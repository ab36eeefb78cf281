"""Local-feature pipelines (instance_search.recipes.hoang) and their runners (instance_search.eval.sweeps).

Cheap by design (shared 2-core machine): random non-negative maps for shapes and round trips; real VGG16
conv5_3 maps of a few small Holidays / UKBench images (max side 160) for the mask shares and the end-to-end
check, skipped when the weights or the shared data are not available.
"""
from __future__ import annotations

import numpy as np
import pytest

from instance_search.recipes.hoang import (
    DIM1024,
    TABLE2,
    TABLE4,
    LocalModelFileError,
    NotFittedError,
    RotationNormalisation,
    Selective,
    embedding_dim,
    mask_cells,
)
from instance_search.eval.sweeps import (_make_selective, _per_image_ms, limit_threads, plot_sweep, subset_benchmark,
                                   sweep_table)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # oversubscribed BLAS / torch pools are many times slower on a shared CPU
    with limit_threads(1):
        yield


def _maps(n, c=96, h=9, w=12, seed=0):
    rng = np.random.default_rng(seed)
    return [np.maximum(rng.standard_normal((c, h, w)).astype(np.float32) - 0.3, 0.0) for _ in range(n)]


# ------------------------------------------------------------------------------------------ Selective


@pytest.mark.parametrize("embedding", sorted(TABLE2))
def test_table2_configs_encode_4224(embedding):
    sel = Selective.table2(embedding, mask="max", aggregation="democratic", features_per_image=100, gmm_iter=10,
                           drop_samples=600)
    assert sel.dim == 4224
    assert sel.embed_dim == embedding_dim(embedding, sel.d, sel.k)
    maps = _maps(14)
    sel.fit(maps[:10])
    v = sel.encode(maps[12])
    assert v.shape == (4224,) and v.dtype == np.float32
    assert np.isclose(np.linalg.norm(v), 1.0, atol=1e-5)
    many = sel.encode_many(maps[10:])
    assert many.shape == (4, 4224)
    np.testing.assert_allclose(many[2], v, atol=1e-5)


def test_table4_dimensions():
    for dim, cfg in TABLE4.items():
        sel = Selective.table4(dim)
        assert sel.dim == dim and sel.embedding == cfg["embedding"] and sel.drop == cfg["d"]


@pytest.mark.parametrize("embedding", sorted(DIM1024))
def test_dim1024_configs_encode_1024(embedding):
    sel = _make_selective(1024, "sum", embedding, "democratic", features_per_image=100, gmm_iter=5,
                          drop_samples=600)
    assert sel.dim == 1024 and sel.embedding == embedding
    assert sel.embed_dim == embedding_dim(embedding, sel.d, sel.k)
    maps = _maps(12, c=64)
    sel.fit(maps[:10])
    v = sel.encode(maps[11])
    assert v.shape == (1024,) and np.isfinite(v).all() and np.isclose(np.linalg.norm(v), 1.0, atol=1e-5)
    # other Table-4 sizes keep T-emb's (d, k) for every embedding
    assert _make_selective(512, "max", "vlad", "sum").d == 32


def test_per_image_ms_counts_cpu_not_sleep():
    import time

    cpu, wall = _per_image_ms(lambda i, x: time.sleep(0.01), [0, 1, 2], repeats=2)
    assert wall >= 9.0 and cpu < 5.0


def test_aggregations_and_masks_run_and_differ():
    maps = _maps(12)
    base = Selective.table4(512, mask="sum", aggregation="sum").fit_local(maps[:8])
    raws = {}
    for agg in ("sum", "mean", "democratic"):
        m = base.with_aggregation(agg)
        m.fit_rn(np.stack([m.raw(x) for x in maps[:8]]))
        raws[agg] = m.encode(maps[9])
        assert raws[agg].shape == (512,)
    np.testing.assert_allclose(raws["sum"], raws["mean"], atol=1e-5)  # L2 before RN makes them equal
    assert not np.allclose(raws["sum"], raws["democratic"], atol=1e-3)
    kept = {m: mask_cells(maps[0], m).mean() for m in ("none", "sum", "max")}
    assert kept["none"] == 1.0 and 0.45 <= kept["sum"] <= 0.55 and 0 < kept["max"] <= 1


def test_sift_mask_needs_keypoints():
    maps = _maps(6)
    rng = np.random.default_rng(5)
    kps = [np.column_stack([rng.uniform(0, 96, 40), rng.uniform(0, 72, 40)]).astype(np.float32) for _ in maps]
    hws = [(72, 96)] * 6
    sel = Selective.table4(512, mask="sift", features_per_image=50)
    with pytest.raises(ValueError, match="keypoints"):
        sel.fit(maps)
    sel.fit(maps, kps, hws)
    two = np.array([[10.0, 20.0], [100.0, 50.0]], np.float32)
    assert sel.select(maps[0], two, hws[0]).shape == (2, 96)
    assert sel.encode(maps[0], kps[0], hws[0]).shape == (512,)
    # no keypoint at all: every cell is kept rather than none
    assert sel.select(maps[0], np.zeros((0, 2)), hws[0]).shape == (9 * 12, 96)


def test_selective_save_load_roundtrip(tmp_path):
    maps = _maps(10)
    sel = Selective.table2("temb", mask="sum", d=16, k=9, aggregation="democratic").fit(maps[:8], trained_on="rand")
    p = sel.save(tmp_path / "sel.npz")
    back = Selective.load(p)
    assert back.trained_on == "rand" and back.dim == sel.dim == 16 * 8
    np.testing.assert_allclose(back.encode(maps[9]), sel.encode(maps[9]), atol=1e-5)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(LocalModelFileError):
        Selective.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "ng.npz", kind=np.array("NgVLAD"), format_version=np.array(1), settings=np.array("{}"))
    with pytest.raises(LocalModelFileError, match="expected Selective"):  # another model kind's file
        Selective.load(tmp_path / "ng.npz")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_refuses_unfitted(tmp_path):
    m = _maps(1)[0]
    for model in (Selective.table4(512),):
        with pytest.raises(NotFittedError):
            model.encode(m)
        with pytest.raises(NotFittedError):
            model.save(tmp_path / "x.npz")
    local_only = Selective.table4(512, mask="none").fit_local(_maps(4))
    with pytest.raises(NotFittedError):
        local_only.encode(m)


def test_rotation_normalisation_keeps_all_dimensions():
    rng = np.random.default_rng(3)
    train, test = rng.standard_normal((12, 40)), rng.standard_normal((5, 40))
    rot = RotationNormalisation(drop=0, whiten=False).fit(train)  # 11 learned axes + 29 complement axes
    y = rot.transform(test)
    assert y.shape == (5, 40)
    xc = test - train.mean(0)
    np.testing.assert_allclose(y @ y.T, xc @ xc.T, rtol=1e-4, atol=1e-4)  # a rotation: inner products kept
    assert RotationNormalisation(drop=3).fit(train).transform(test).shape == (5, 37)
    with pytest.raises(ValueError):
        RotationNormalisation(drop=20).fit(train)


# ------------------------------------------------------------------------------------------ runners


def test_subset_benchmark_and_table(tmp_path):
    from instance_search.eval.datasets import find_shared_data, load_benchmark

    if find_shared_data() is None:
        pytest.skip("no shared data folder")
    ukb = subset_benchmark(load_benchmark("ukbench"), 42)
    assert ukb.n_images == 40 and ukb.n_queries == 40 and not ukb.comparable
    hol = subset_benchmark(load_benchmark("holidays"), 60)
    assert hol.n_images == 60 and all(len(g["ok"]) for g in hol.gnd)
    assert max(max(g["ok"]) for g in hol.gnd) < 60
    fake = {"rows": [{"benchmark": "holidays", "train": "ukbench", "layer": l, "scale": s, "map": m}
                     for l, s, m in [("conv4_3", "1", 50.0), ("conv5_3", "1", 40.0), ("conv4_3", "2", 45.0),
                                     ("conv5_3", "2", 48.0)]],
            "settings": {"backbone": "vgg16", "k": 100, "out_dim": 128, "benchmarks": {"holidays": "holidays"}}}
    table = sweep_table(fake)
    assert "| conv4_3 | **50.0** | 45.0 |" in table
    png = plot_sweep(fake, tmp_path / "s.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------ real maps


@pytest.fixture(scope="module")
def real_maps():
    """conv5_3 maps (max side 160) + SIFT keypoints of the first 48 Holidays images: the first 24 are the test
    collection, images 24-47 (other scenes) the held-out training collection."""
    from instance_search.eval.datasets import find_shared_data, load_benchmark
    from instance_search.images import load_image
    from instance_search.ops.masks import sift_keypoints

    if find_shared_data() is None:
        pytest.skip("no shared data folder")
    try:
        from instance_search.backbones import load_backbone

        bb = load_backbone("vgg16", progress=False)
    except Exception as exc:  # weights not cached and no registry reachable
        pytest.skip(f"VGG16 weights unavailable: {exc}")
    full = load_benchmark("holidays")
    maps, kps, hws = [], [], []
    with limit_threads(1):
        for p in full.images[:48]:
            img = load_image(p, max_size=160)
            maps.append(bb.features(img, ["conv5_3"], (1.0,))[("conv5_3", 1.0)].numpy())
            kps.append(sift_keypoints(img))
            hws.append((img.height, img.width))
    return subset_benchmark(full, 24), (maps[:24], kps[:24], hws[:24]), (maps[24:], kps[24:], hws[24:])


def test_mask_shares_on_real_maps(real_maps):
    _, (maps, kps, hws), _ = real_maps
    share = {m: float(np.mean([mask_cells(x, m, kps[i], hws[i]).mean() for i, x in enumerate(maps)]))
             for m in ("sift", "sum", "max")}
    assert 0.45 <= share["sum"] <= 0.56  # >= median: half of the cells by construction
    assert 0.05 < share["max"] < 0.95 and 0.05 < share["sift"] <= 1.0


def _pair_accuracy(bench, vecs):
    """Share of (same-scene, other) image pairs a query ranks in the right order (chance: 0.5), and P@1."""
    q = np.asarray(bench.query_indices)
    s = vecs[q] @ vecs.T
    acc, p1 = [], []
    for i, g in enumerate(bench.gnd):
        pos = np.asarray(g["ok"])
        neg = np.setdiff1d(np.arange(bench.n_images), np.concatenate([pos, [q[i]]]))
        acc.append(float((s[i, pos][:, None] > s[i, neg][None, :]).mean()))
        row = s[i].copy()
        row[q[i]] = -np.inf
        p1.append(float(row.argmax() in set(pos.tolist())))
    return float(np.mean(acc)), float(np.mean(p1))


def test_end_to_end_holidays24_beats_chance(real_maps):
    bench, (maps, kps, hws), (tmaps, tkps, thws) = real_maps  # everything learned on held-out images
    sel = Selective.table4(512, mask="max", aggregation="democratic", features_per_image=50).fit(tmaps, tkps, thws)
    acc, p1 = _pair_accuracy(bench, sel.encode_many(maps, kps, hws))
    print("selective", acc, p1)
    assert acc > 0.75 and p1 > 0.3, (acc, p1)  # chance: 0.5 and ~0.06
