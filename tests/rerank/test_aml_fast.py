"""Fast approximate AML (rerank/aml_fast.py) against slow, obviously correct loops on real Paris VGG16 maps."""
from __future__ import annotations

import numpy as np
import pytest

from instance_search.index.compact import decode_sparse, encode_map
from instance_search.ops import integral as I
from instance_search.rerank.aml_fast import AMLInvertedMaps, aml_fast_search, rerank_aml_fast, window_macs

pytestmark = pytest.mark.slow  # its module fixture alone takes seconds (pytest --durations)

PARIS = ["paris_defense_000041.jpg", "paris_eiffel_000128.jpg", "paris_louvre_000004.jpg",
         "paris_moulinrouge_000003.jpg"]


@pytest.fixture(scope="module")
def maps(paris):
    """conv5_3 maps (post-ReLU) of four Paris photos at max side 320 px, cropped to different small sizes."""
    from PIL import Image

    backbones = pytest.importorskip("instance_search.backbones")
    try:
        bb = backbones.load_backbone("vgg16", progress=False)
    except backbones.WeightsError as exc:
        pytest.skip(f"VGG16 weights unavailable: {exc}")
    out = []
    for name, (h, w) in zip(PARIS, [(9, 13), (11, 8), (10, 10), (7, 12)]):
        img = Image.open(paris / name).convert("RGB")
        img.thumbnail((320, 320))
        X = bb.features(img, layers=["conv5_3"])[("conv5_3", 1.0)].numpy().astype(np.float32)
        assert X.shape[1] >= h and X.shape[2] >= w
        out.append(np.ascontiguousarray(X[:, :h, :w]))
    return out


def coarse_max(X, g):
    """Max-pool by g with a loop over coarse cells (partial blocks at the far borders)."""
    C, H, W = X.shape
    gh, gw = -(-H // g), -(-W // g)
    out = np.zeros((C, gh, gw), X.dtype)
    for y in range(gh):
        for x in range(gw):
            out[:, y, x] = X[:, y * g:(y + 1) * g, x * g:(x + 1) * g].max(axis=(1, 2))
    return out


def restricted_cos(f, q):
    return float(f @ q / max(np.linalg.norm(f), 1e-300) / np.linalg.norm(q))


def test_store_holds_max_pooled_cells(maps):
    for g in (1, 2, 3):
        store = AMLInvertedMaps.build(maps, g=g)
        assert len(store) == 4 and store.nbytes > 0
        for i, X in enumerate(maps):
            ref = coarse_max(X, g)
            C, gh, gw = ref.shape
            assert tuple(store.coarse_shapes[i]) == (gh, gw)
            got = np.zeros_like(ref)
            for c in range(C):
                a, b = store.offsets[i * C + c], store.offsets[i * C + c + 1]
                got[c, store.cy[a:b], store.cx[a:b]] = store.value[a:b]
            np.testing.assert_array_equal(got, ref)
    # a decoded compact map gives the same store as its dense form
    sp = [decode_sparse(encode_map(X)) for X in maps]
    a, b = AMLInvertedMaps.build(sp, g=2), AMLInvertedMaps.build([m.dense() for m in sp], g=2)
    for f in ("offsets", "cy", "cx", "value"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    # a generator consumed a chunk at a time (the chunk boundary inside the list) gives the same store
    c = AMLInvertedMaps.build((m for m in sp), g=2, chunk=3)
    for f in ("shapes", "offsets", "cy", "cx", "value", "mac", "code"):
        np.testing.assert_array_equal(getattr(a, f), getattr(c, f))
        assert getattr(a, f).dtype == getattr(c, f).dtype


@pytest.mark.parametrize("pooling", ["max", "power"])
def test_window_scores_match_loop_reference(maps, pooling):
    """Every window's Eq. 4 score restricted to the query's K strongest channels, on g=2 coarse maps, against a
    loop over images and windows (np.max over the window's fine cells, or the α-power sum of the coarse cells)."""
    g, K, alpha = 2, 24, 10.0
    q = maps[2].max(axis=(1, 2))  # the MAC of one image as the query
    ks = np.argsort(-q)[:K]
    store = AMLInvertedMaps.build(maps, g=g)
    wins = I.all_windows(6, 7)
    boxes, best, n, allsc = aml_fast_search(store, np.arange(4), q, K=K, pooling=pooling, windows=wins,
                                            return_all=True)
    for b, X in enumerate(maps):
        gh, gw = store.coarse_shapes[b]
        Xc = coarse_max(X, g)[ks]
        s = Xc.reshape(K, -1).max(1)
        s = np.where(s > 0, s, 1.0)
        ref = np.full(len(wins), -np.inf)
        for j, (x, y, w, h) in enumerate(wins):
            if x + w > gw or y + h > gh:
                continue
            if pooling == "max":
                f = X[ks, y * g:(y + h) * g, x * g:(x + w) * g].max(axis=(1, 2))
            else:  # sums below 1e-14 of the channel total are float64 noise in integral images: zero (ops.integral)
                P = (Xc.astype(np.float64) / s[:, None, None]) ** alpha
                S = P[:, y:y + h, x:x + w].sum(axis=(1, 2))
                f = s * np.where(S > 1e-14 * P.sum(axis=(1, 2)), S, 0) ** (1 / alpha)
            ref[j] = restricted_cos(f.astype(np.float64), q[ks].astype(np.float64))
        valid = np.isfinite(ref)
        assert n[b] == valid.sum() and np.array_equal(np.isfinite(allsc[:, b]), valid)
        # max pooling ranks on values rounded to 65535 levels (returned best score exact); power is float64
        tol = 1e-4 if pooling == "max" else 1e-5  # power: integral-image rounding through the 1/α root
        np.testing.assert_allclose(allsc[valid, b], ref[valid], atol=tol)
        # the returned window is (near-)best and its returned score is the reference score of that window
        assert best[b] >= ref[valid].max() - tol
        cx1, cy1 = boxes[b][0] // g, boxes[b][1] // g
        cx2, cy2 = -(-(boxes[b][0] + boxes[b][2]) // g), -(-(boxes[b][1] + boxes[b][3]) // g)
        jj = np.flatnonzero((wins[:, 0] == cx1) & (wins[:, 1] == cy1) & (wins[:, 0] + wins[:, 2] == cx2) &
                            (wins[:, 1] + wins[:, 3] == cy2))
        assert len(jj) == 1 and abs(best[b] - ref[jj[0]]) < 1e-5


def test_full_channels_fine_grid_reproduce_aml_scoring(maps):
    """K = C and g = 1, power pooling: the scores of aml_search's scoring (Eq. 3-4 from integral images) for the
    same windows, and the exhaustive search's best window and score."""
    store = AMLInvertedMaps.build(maps, g=1)
    q = maps[0][:, 2:6, 3:9].max(axis=(1, 2))
    C = q.shape[0]
    for b, X in enumerate(maps):
        H, W = X.shape[1:]
        wins = I.sample_windows(H, W, 2, None, grid="map")
        _, _, _, sc = aml_fast_search(store, [b], q, K=C, pooling="power", windows=wins, return_all=True)
        ref = I.window_scores(I.power_integral(X, 10.0), wins, q)
        np.testing.assert_allclose(sc[:, 0], ref, rtol=0, atol=1e-9)
        allw = I.all_windows(H, W)
        box, best, n = aml_fast_search(store, [b], q, K=C, pooling="power", windows=allw)
        ex_box, ex_score, ex_n = I.exhaustive_search(X, q)
        assert n[0] == ex_n and abs(best[0] - ex_score) < 1e-9 and tuple(box[0]) == ex_box


def test_rerank_scores_window_mac_and_sampled_windows(maps):
    """rerank_aml_fast: boxes in map cells on the coarse grid, window MAC over all channels exact, order by score;
    default window sampling = sample_windows on each image's coarse grid within the aspect filter."""
    g = 3
    store = AMLInvertedMaps.build(maps, g=g)
    q = maps[1][:, 1:8, 2:7].max(axis=(1, 2))
    rows = np.array([3, 0, 2, 1])
    res = rerank_aml_fast(q, store, rows, K=16, query_aspect=5 / 7, s=1.1, step=1)
    for k, b in enumerate(rows):
        X = maps[b]
        x, y, w, h = res.boxes[k]
        assert x % g == 0 and y % g == 0 and w >= 1 and h >= 1 and x + w <= X.shape[2] and y + h <= X.shape[1]
        f = X[:, y:y + h, x:x + w].max(axis=(1, 2))
        np.testing.assert_allclose(window_macs(store, [b], res.boxes[k:k + 1])[0], f)
        assert abs(res.scores[k] - restricted_cos(f.astype(np.float64), q.astype(np.float64))) < 1e-5
        gh, gw = store.coarse_shapes[b]
        assert res.n_windows[k] == len(I.sample_windows(int(gh), int(gw), 1, 5 / 7, 1.1, grid="map"))
    assert np.all(np.diff(res.scores[res.order]) <= 0)
    srch = rerank_aml_fast(q, store, rows, K=16, query_aspect=5 / 7, step=1, score="search")
    np.testing.assert_array_equal(srch.boxes, res.boxes)
    assert srch.vectors is None and res.vectors.shape == (4, q.shape[0])


def test_bad_input(maps):
    store = AMLInvertedMaps.build(maps[:2], g=2)
    q = maps[0].max(axis=(1, 2))
    with pytest.raises(ValueError, match="K"):
        aml_fast_search(store, [0], q, K=0)
    with pytest.raises(ValueError, match="g"):
        AMLInvertedMaps.build(maps, g=0)
    with pytest.raises(ValueError, match="channels"):
        AMLInvertedMaps.build([maps[0], maps[1][:100]], g=2)
    with pytest.raises(ValueError, match="dimensions"):
        aml_fast_search(store, [0], q[:10])
    with pytest.raises(ValueError, match="rows"):
        aml_fast_search(store, [5], q)
    with pytest.raises(ValueError, match="pooling"):
        aml_fast_search(store, [0], q, pooling="mean")
    with pytest.raises(ValueError, match="score"):
        rerank_aml_fast(q, store, [0], score="rmac")
    with pytest.raises(ValueError, match="non-negative"):
        AMLInvertedMaps.build([-maps[0]], g=2)


def test_collection_and_cli_aml_fast(ukbench, tmp_path_factory):
    """rerank="aml-fast" in Collection.search and `isearch search --rerank aml-fast`: the short list is
    re-ordered by the window-MAC score, every re-ranked hit gets a box inside its image."""
    from typer.testing import CliRunner

    from conftest import build_server_index
    from instance_search.cli.main import app
    from instance_search.collection import Collection

    photos, root = build_server_index(ukbench, tmp_path_factory)
    col = Collection.open(root)
    col.aml_fast_options = {"K": 64, "g": 2, "step": 1}
    query = photos / "ukbench00001.jpg"
    hits = col.search(query, top=12, rerank="aml-fast", shortlist=8)
    assert len(hits) == 12 and all(h.box is not None for h in hits[:8]) and all(h.box is None for h in hits[8:])
    assert [h.score for h in hits[:8]] == sorted([h.score for h in hits[:8]], reverse=True)
    recs = {r["id"]: r for r in col.records()}
    for h in hits[:8]:
        x1, y1, x2, y2 = h.box
        assert 0 <= x1 < x2 <= recs[h.id]["width"] + 1e-6 and 0 <= y1 < y2 <= recs[h.id]["height"] + 1e-6
    # the same object (ukbench00000-00003) comes first, as without re-ranking
    assert {h.path.rsplit("/", 1)[-1] for h in hits[:4]} == {f"ukbench{i:05d}.jpg" for i in range(4)}
    with pytest.raises(ValueError, match="aml-fast"):
        col.search(query, rerank="fast")
    out = CliRunner().invoke(app, ["search", str(query), "--index", str(root), "--rerank", "aml-fast", "--top", "3",
                                   "--shortlist", "6", "--fast-k", "32", "--fast-g", "4", "--json"])
    assert out.exit_code == 0, out.output
    assert '"box"' in out.output and "ukbench0000" in out.output
