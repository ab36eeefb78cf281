"""Re-ranking: AML (Tolias et al. 2016, Sec. 6), CA-SR (Salvador et al. 2016, Sec. 3.3), QE and DBA."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instance_search.ops.integral import exact_window_max, window_iou
from instance_search.rerank import (
    alpha_qe,
    average_qe,
    ca_sr,
    cells_to_pixels,
    dba,
    pixels_to_cells,
    region_mac,
    rerank_aml,
    rmac_boxes,
    sliding_windows,
)

C = 48
HALF = C // 2


def scene(rng, H, W, box=None, obj=None):
    """Clutter strong in channels HALF.., weak in ..HALF; an object (one peak per channel ..HALF with the
    values ``obj``) spread over ``box`` (x, y, w, h), touching its four borders and hiding the clutter."""
    X = np.zeros((C, H, W), dtype=np.float32)
    X[HALF:] = (rng.random((C - HALF, H, W)) < 0.3) * rng.gamma(2.0, 15.0, (C - HALF, H, W))
    X[:HALF] = rng.random((HALF, H, W)) * 3.0
    if box is not None:
        x, y, w, h = box
        ys, xs = rng.integers(y, y + h, HALF), rng.integers(x, x + w, HALF)
        xs[0], xs[1], ys[2], ys[3] = x, x + w - 1, y, y + h - 1
        X[np.arange(HALF), ys, xs] = obj
        X[HALF:, y:y + h, x:x + w] = rng.random((C - HALF, h, w)) * 3.0
    return X


@pytest.fixture(scope="module")
def shortlist():
    rng = np.random.default_rng(0)
    obj = rng.uniform(60.0, 100.0, HALF)
    other = rng.permutation(obj) * rng.uniform(0.3, 1.0, HALF)  # a different object, same channels
    qbox = (4, 3, 9, 6)
    Xq = scene(rng, 14, 20, qbox, obj)
    q = region_mac(Xq, qbox)
    maps, boxes, positive = [], [], []
    for i, (H, W, box) in enumerate([(16, 24, (12, 8, 9, 6)), (18, 22, None), (14, 20, (1, 1, 9, 6)),
                                     (15, 25, None), (20, 20, (10, 12, 9, 6))]):
        neg_box = (5, 5, 9, 6)
        maps.append(scene(rng, H, W, box if box else neg_box, obj if box else other))
        boxes.append(box)
        positive.append(box is not None)
    return q, qbox, maps, boxes, np.array(positive)


def test_box_conversions():
    px = cells_to_pixels([2, 1, 3, 4], map_hw=(10, 20), image_wh=(640, 320))
    np.testing.assert_allclose(px, [64, 32, 160, 160])
    np.testing.assert_array_equal(pixels_to_cells(px, (640, 320), (10, 20)), [2, 1, 3, 4])
    many = np.array([[0, 0, 20, 10], [5, 5, 1, 1]])
    np.testing.assert_array_equal(pixels_to_cells(cells_to_pixels(many, (10, 20), (640, 320)), (640, 320), (10, 20)),
                                  many)
    # a pixel box is covered by its cell box
    cb = pixels_to_cells([70, 40, 100, 41], (640, 320), (10, 20))
    bx = cells_to_pixels(cb, (10, 20), (640, 320))
    assert bx[0] <= 70 and bx[1] <= 40 and bx[2] >= 100 and bx[3] >= 41 and (cb[2:] >= 1).all()


def test_rerank_aml_localises_and_ranks_positives_first(shortlist):
    q, qbox, maps, boxes, positive = shortlist
    res = rerank_aml(q, maps, query_aspect=qbox[2] / qbox[3])
    assert set(res.order[: positive.sum()]) == set(np.flatnonzero(positive))
    for i in np.flatnonzero(positive):
        assert window_iou(res.boxes[i], boxes[i]) >= 0.7, (res.boxes[i], boxes[i])
    assert (res.scores[positive] > 0.9).all() and res.n_windows.min() > 0
    # the final score is the exact MAC cosine of the returned box
    i = int(np.flatnonzero(positive)[0])
    v = exact_window_max(maps[i], [res.boxes[i]])[0]
    cos = float(v @ q / np.linalg.norm(v) / np.linalg.norm(q))
    assert res.scores[i] == pytest.approx(cos, rel=1e-5)
    # whitening by an orthogonal map leaves cosines unchanged; torch maps give the same answer
    Q = np.linalg.qr(np.random.default_rng(1).normal(size=(C, C)))[0]
    res_w = rerank_aml(q, [torch.from_numpy(m) for m in maps], query_aspect=qbox[2] / qbox[3],
                       whitening=lambda M: M @ torch.from_numpy(Q).to(M.dtype))
    np.testing.assert_allclose(res_w.scores, res.scores, rtol=1e-5)
    np.testing.assert_array_equal(res_w.boxes, res.boxes)


def test_rerank_aml_window_rmac_matches_reference(shortlist):
    """With R-MAC filtering, the window is re-scored by its own R-MAC (regions pooled from the integral images)
    against the query R-MAC: checked against a loop over the windows with the single-map functions."""
    from instance_search.ops.integral import power_integral, window_maxpool_approx
    from instance_search.ops.pooling import rmac_regions

    q, qbox, maps, boxes, positive = shortlist
    P = np.eye(C) + 0.05 * np.random.default_rng(5).normal(size=(C, C))  # a whitening-like rotation

    def finalize(local):  # L2 -> projection -> L2 -> sum -> L2, the shape of the recipe's finalize
        L = local / np.linalg.norm(local, axis=1, keepdims=True)
        L = L @ P
        L /= np.linalg.norm(L, axis=1, keepdims=True)
        g = L.sum(0)
        return g / np.linalg.norm(g)

    qg = finalize(q[None])
    res = rerank_aml(q, maps, query_aspect=qbox[2] / qbox[3], finalize=finalize, query_global=qg)
    base = rerank_aml(q, maps, query_aspect=qbox[2] / qbox[3])
    np.testing.assert_array_equal(res.boxes, base.boxes)  # same localisation
    for i, X in enumerate(maps):
        x, y, w, h = res.boxes[i]
        reg = rmac_regions(h, w, 3) + np.array([x, y, 0, 0])
        local = window_maxpool_approx(power_integral(X, 10.0), reg)
        # 1e-3: the batched path drops cells with (X/s)^alpha < 1e-15, i.e. below 3 % of the channel max (the
        # float64 noise floor of window sums), the reference does not; it matters in the regions without a peak
        # of these synthetic maps, whose weak channels the per-region L2 normalisation then magnifies
        assert res.scores[i] == pytest.approx(float(finalize(local) @ qg), abs=1e-3)
    np.testing.assert_array_equal(res.order, np.argsort(-res.scores, kind="stable"))
    # finalize called once with the list of every map's regions gives the same scores
    res_b = rerank_aml(q, maps, query_aspect=qbox[2] / qbox[3], finalize=lambda Ls: np.stack([finalize(L) for L in Ls]),
                       finalize_batch=True, query_global=qg)
    np.testing.assert_array_equal(res_b.boxes, res.boxes)
    np.testing.assert_allclose(res_b.scores, res.scores, rtol=1e-12)
    with pytest.raises(ValueError, match="both"):
        rerank_aml(q, maps, finalize=finalize)


def test_rerank_from_compact_non_zeros_equals_dense(shortlist):
    """Re-ranking from decode_sparse (the non-zeros of compact codes) = re-ranking the decoded dense maps."""
    from instance_search.index.compact import decode_map, decode_sparse, encode_map

    q, qbox, maps, boxes, positive = shortlist
    codes = [encode_map(m) for m in maps]
    dense = rerank_aml(q, [decode_map(c) for c in codes], query_aspect=qbox[2] / qbox[3])
    sparse = rerank_aml(q, [decode_sparse(c) for c in codes], query_aspect=qbox[2] / qbox[3])
    np.testing.assert_array_equal(sparse.boxes, dense.boxes)
    np.testing.assert_allclose(sparse.scores, dense.scores, rtol=1e-6)
    assert set(sparse.order[: positive.sum()]) == set(np.flatnonzero(positive))
    approx = rerank_aml(q, [decode_sparse(c) for c in codes], query_aspect=qbox[2] / qbox[3], exact=False)
    approx_d = rerank_aml(q, [decode_map(c) for c in codes], query_aspect=qbox[2] / qbox[3], exact=False)
    np.testing.assert_allclose(approx.scores, approx_d.scores, rtol=1e-9)


def test_rerank_tie_break_uses_shortlist_scores():
    X = np.ones((4, 5, 5), dtype=np.float32)
    res = rerank_aml(np.ones(4), [X, X, X], shortlist_scores=[0.1, 0.9, 0.5])
    np.testing.assert_array_equal(res.order, [1, 2, 0])


def ca_sr_reference(q, maps, gen):
    best = []
    for X in maps:
        boxes = gen(X.shape[1], X.shape[2])
        V = np.stack([X[:, y:y + h, x:x + w].max((1, 2)) for x, y, w, h in boxes]).astype(np.float64)
        cos = V @ q / np.maximum(np.linalg.norm(V, axis=1), 1e-12) / np.linalg.norm(q)
        best.append((cos.max(), boxes[int(np.argmax(cos))]))
    return best


def test_ca_sr_matches_loop_reference(shortlist):
    q, qbox, maps, boxes, positive = shortlist
    for gen in (sliding_windows, rmac_boxes(3)):
        res = ca_sr(q, maps, gen)
        ref = ca_sr_reference(q.astype(np.float64), maps, gen)
        np.testing.assert_allclose(res.scores, [r[0] for r in ref], rtol=1e-5)
        np.testing.assert_array_equal(res.boxes, [r[1] for r in ref])
    res = ca_sr(q, maps)  # default sliding windows rank positives first
    assert set(res.order[: positive.sum()]) == set(np.flatnonzero(positive))

    def with_query_size(H, W):  # pluggable generator: sliding windows + every window of the query's size
        w, h = qbox[2], qbox[3]
        same = [(x, y, w, h) for y in range(H - h + 1) for x in range(W - w + 1)]
        return np.concatenate([sliding_windows(H, W), np.array(same)])

    res = ca_sr(q, maps, with_query_size)
    assert set(res.order[: positive.sum()]) == set(np.flatnonzero(positive))
    for i in np.flatnonzero(positive):
        assert window_iou(res.boxes[i], boxes[i]) >= 0.7
    approx = ca_sr(q, maps, method="integral")
    assert set(approx.order[: positive.sum()]) == set(np.flatnonzero(positive))
    with pytest.raises(ValueError):
        ca_sr(q, maps, method="nope")


def test_sliding_windows_valid():
    sw = sliding_windows(13, 21)
    assert [0, 0, 21, 13] in sw.tolist() and len(sw) == len(np.unique(sw, axis=0))
    assert (sw[:, 0] + sw[:, 2] <= 21).all() and (sw[:, 1] + sw[:, 3] <= 13).all() and (sw[:, 2:] >= 1).all()


# ---------------------------------------------------------------------------------------- expansion
def l2n(M):
    return M / np.linalg.norm(M, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(2)
    db = l2n(rng.normal(size=(60, 16)))
    qs = l2n(db[:3] + 0.5 * rng.normal(size=(3, 16)))
    return qs, db


def test_average_qe_matches_loop(vectors):
    qs, db = vectors
    for q in qs:
        sims = db @ q
        top = np.argsort(-sims)[:5]
        ref = q.copy()
        for j in top:
            ref = ref + db[j]
        ref = ref / np.linalg.norm(ref)
        np.testing.assert_allclose(average_qe(q, db, top=5), ref, rtol=1e-10)
        np.testing.assert_allclose(average_qe(q, db, sims, top=5), ref, rtol=1e-10)  # float scores
        np.testing.assert_allclose(average_qe(q, db, np.argsort(-sims), top=5), ref, rtol=1e-10)  # ranks
    np.testing.assert_allclose(average_qe(qs, db, top=5), np.stack([average_qe(q, db, top=5) for q in qs]),
                               rtol=1e-12)


def test_alpha_qe_matches_loop(vectors):
    qs, db = vectors
    for q in qs:
        sims = db @ q
        ref = q.copy()
        for j in np.argsort(-sims)[:7]:
            ref = ref + max(sims[j], 0.0) ** 3 * db[j]
        np.testing.assert_allclose(alpha_qe(q, db, top=7, alpha=3), ref / np.linalg.norm(ref), rtol=1e-10)
    np.testing.assert_allclose(alpha_qe(qs, db, top=7, alpha=0), average_qe(qs, db, top=7), rtol=1e-12)


def test_dba_matches_loop(vectors):
    _, db = vectors
    ref = np.empty_like(db)
    for i in range(len(db)):
        sims = db @ db[i]
        sims[i] = np.inf
        acc = np.zeros(db.shape[1])
        for j in np.argsort(-sims)[:4]:
            acc += (1.0 if j == i else max(db[i] @ db[j], 0.0) ** 2) * db[j]
        ref[i] = acc / np.linalg.norm(acc)
    np.testing.assert_allclose(dba(db, k=4, alpha=2, chunk=7), ref, rtol=1e-10)
    # precomputed neighbours (self somewhere in the list, or absent) give the same result
    nn = np.argsort(-(db @ db.T), axis=1)[:, :6]
    np.testing.assert_allclose(dba(db, k=4, alpha=2, neighbours=nn), ref, rtol=1e-10)
    np.testing.assert_allclose(dba(db, k=4, alpha=2, neighbours=nn[:, 1:]), ref, rtol=1e-10)
    plain = dba(db, k=3, alpha=0)
    i = 5
    s = db @ db[i]
    s[i] = np.inf
    np.testing.assert_allclose(plain[i], l2n(db[np.argsort(-s)[:3]].sum(0)), rtol=1e-10)


def test_mac_components_match_loop_and_picture(vgg_conv5, tmp_path, data_dir):
    """Fig. 2 helper: top MAC contributions checked against a loop; the picture is written."""
    from PIL import Image

    from instance_search.viz import draw_mac_receptive_fields, mac_components

    A = vgg_conv5
    B = np.roll(A, 2, axis=2) * 0.5 + 0.1 * A
    rows = mac_components(A, B, k=5)
    ma, mb = A.max(axis=(1, 2)), B.max(axis=(1, 2))
    ma, mb = ma / np.linalg.norm(ma), mb / np.linalg.norm(mb)
    ref = sorted(range(len(ma)), key=lambda c: -ma[c] * mb[c])[:5]
    assert [r[0] for r in rows] == ref
    for c, contrib, (ya, xa), (yb, xb) in rows:
        assert contrib == pytest.approx(ma[c] * mb[c], rel=1e-5)
        assert A[c, ya, xa] == A[c].max() and B[c, yb, xb] == B[c].max()
    img = Image.open(data_dir / "oxford5k-queries10" / "bodleian_000132.jpg").convert("RGB")
    img.thumbnail((384, 384))
    out = draw_mac_receptive_fields(img, img, A, B, tmp_path / "fig2.png")
    assert out.stat().st_size > 20_000
    with pytest.raises(ValueError, match="same C"):
        mac_components(A, B[:3])


def test_cosine_scores_against_a_loop():
    """cos(L2(W(L2 f_R)), L2(W(L2 q))) per region (Tolias et al. Sec. 3), with and without a whitening, checked
    region by region; a whitening with the wrong output shape is refused."""
    from instance_search.rerank.aml import cosine_scores

    rng = np.random.default_rng(3)
    X = scene(rng, 12, 16, box=(3, 2, 6, 5), obj=40.0)
    regions = np.stack([X[:, y:y + 4, x:x + 5].max(axis=(1, 2)) for y in range(0, 8, 3) for x in range(0, 11, 4)])
    q = X[:, 2:7, 3:9].max(axis=(1, 2))
    P = rng.standard_normal((16, C))
    mu = regions.mean(0)

    def white(M):
        return (np.asarray(M, np.float64) - mu) @ P.T

    def l2(v):
        return v / np.linalg.norm(v)

    for w, f in ((None, lambda v: l2(v)), (white, lambda v: l2(white(l2(v)[None])[0]))):
        want = np.array([float(f(r.astype(np.float64)) @ f(q.astype(np.float64))) for r in regions])
        got = cosine_scores(regions, q, whitening=w)
        assert got.dtype == torch.float64 and got.shape == (len(regions),)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="whitening must map"):
        cosine_scores(regions, q, whitening=lambda M: np.zeros(5))


# ------------------------------------------------------------------------------------- coarse-to-fine AML
def _c2f_inputs(maps):
    from instance_search.index.compact import decode_sparse, encode_map
    from instance_search.rerank.aml_fast import AMLInvertedMaps

    sparse = [decode_sparse(encode_map(m)) for m in maps]
    return sparse, AMLInvertedMaps.build(sparse, g=4)


def test_c2f_with_whole_map_radius_equals_exact_aml(shortlist, vgg_conv5):
    """Issue 14: coarse-to-fine AML whose refinement radius covers the whole map is exact AML (every sampled
    window verified exactly): same boxes, scores and vectors, for MAC (whitened or not) and window R-MAC."""
    from instance_search.rerank.aml_c2f import rerank_aml_c2f

    q, qbox, maps, boxes, positive = shortlist
    P = np.eye(C) + 0.05 * np.random.default_rng(5).normal(size=(C, C))

    def finalize(local):
        L = local / np.maximum(np.linalg.norm(local, axis=1, keepdims=True), 1e-12)
        L = L @ P
        L /= np.maximum(np.linalg.norm(L, axis=1, keepdims=True), 1e-12)  # compact maps: empty regions
        g = L.sum(0)
        return g / np.linalg.norm(g)

    V = vgg_conv5.astype(np.float32)
    vq = exact_window_max(V, [(3, 4, 7, 6)])[0]
    real = [V, V[:, 2:, 1:], V[:, :, ::-1].copy(), V[:, 3:20, :14]]
    cases = [(q, maps, qbox[2] / qbox[3], {}),
             (q, maps, None, {"whitening": lambda M: M @ torch.from_numpy(P).float()}),
             (q, maps, qbox[2] / qbox[3], {"finalize": finalize, "query_global": finalize(q[None])}),
             (vq, real, 7 / 6, {}), (vq, real, 7 / 6, {"exact": False})]
    for qv, mm, aspect, kw in cases:
        sparse, store = _c2f_inputs(mm)
        ref = rerank_aml(qv, sparse, query_aspect=aspect, verify=0, **kw)
        got = rerank_aml_c2f(qv, sparse, store, np.arange(len(mm)), query_aspect=aspect, radius=100, top=1, **kw)
        np.testing.assert_array_equal(got.boxes, ref.boxes)
        assert np.isfinite(got.scores).all()
        np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(got.order, ref.order)
        if ref.vectors is None:  # exact=False without whitening: scored by the search score itself
            assert got.vectors is None
        else:
            np.testing.assert_allclose(got.vectors, ref.vectors, rtol=1e-12, atol=1e-12)
        assert (got.n_windows > ref.n_windows).all()  # + the coarse windows


def test_c2f_default_radius_localises_and_scores_fewer_windows(shortlist):
    from instance_search.rerank.aml_c2f import fine_candidates, rerank_aml_c2f

    q, qbox, maps, boxes, positive = shortlist
    sparse, store = _c2f_inputs(maps)
    ref = rerank_aml(q, sparse, query_aspect=qbox[2] / qbox[3])
    got = rerank_aml_c2f(q, sparse, store, np.arange(len(maps)), query_aspect=qbox[2] / qbox[3])
    assert set(got.order[: positive.sum()]) == set(np.flatnonzero(positive))
    for i, box in enumerate(boxes):
        if box is not None:
            assert window_iou(got.boxes[i], box) >= 0.7, (got.boxes[i], box)
            assert got.scores[i] == pytest.approx(ref.scores[i], abs=1e-9)
    # the fine candidates: grid windows whose four borders are each within the radius of a proposal's
    from instance_search.ops.integral import sample_windows

    props = np.array([[[4, 2, 8, 8], [0, 0, 4, 4]]])
    cand, cnt = fine_candidates(14, 20, props, np.array([[True, False]]), 2, 3, None, 1.1)
    grid = sample_windows(14, 20, 3)
    e = np.c_[grid[:, :2], grid[:, :2] + grid[:, 2:]]
    want = grid[(np.abs(e - [4, 2, 12, 10]) <= 2).all(1)]
    np.testing.assert_array_equal(cand[0][:cnt[0]], want)
    # several maps and proposals against a loop over the grid; a map near no grid window gets its proposal
    rng = np.random.default_rng(4)
    P = np.stack([np.c_[rng.integers(0, 10, (3, 2)), rng.integers(1, 10, (3, 2))] for _ in range(6)])
    P[5] = [[19, 13, 1, 1]] * 3
    V = rng.random((6, 3)) < 0.7
    V[:, 0] = True
    grid = sample_windows(14, 20, 3, 0.8, 1.3)
    cand, cnt = fine_candidates(14, 20, P, V, 1, 3, 0.8, 1.3)
    for b in range(6):
        keep = [g for g in grid if any(V[b, p] and all(abs(a - c) <= 1 for a, c in zip(
            (g[0], g[1], g[0] + g[2], g[1] + g[3]), (P[b, p, 0], P[b, p, 1], P[b, p, 0] + P[b, p, 2],
                                                     P[b, p, 1] + P[b, p, 3]))) for p in range(3))]
        want = np.asarray(keep).reshape(-1, 4) if keep else P[b, :1]
        np.testing.assert_array_equal(cand[b, :cnt[b]], want)
    assert cnt[5] == 1
    with pytest.raises(ValueError, match="radius"):
        fine_candidates(14, 20, props, np.array([[True, False]]), -1)
    with pytest.raises(ValueError, match="rows"):
        rerank_aml_c2f(q, sparse, store, np.arange(len(maps) - 1))
    with pytest.raises(ValueError, match="not the same image"):
        rerank_aml_c2f(q, sparse, store, np.arange(len(maps))[::-1])


def test_c2f_registered_reranker(shortlist):
    from instance_search.rerank.base import RerankContext, make_reranker

    q, qbox, maps, boxes, positive = shortlist
    sparse, _ = _c2f_inputs(maps)
    ctx = RerankContext(maps=lambda ids, sp: [sparse[i] for i in ids], all_ids=lambda: range(len(maps)), version=1)
    rr = make_reranker("aml-c2f", g=4, top=2)
    qmap = np.zeros((C, qbox[3], qbox[2]), np.float32)
    qmap[:, 0, 0] = q
    ids = [4, 2, 0, 1]
    res, shapes = rr.rerank(q, qmap, ids, np.zeros(4), ctx)
    assert shapes == [tuple(maps[i].shape[1:]) for i in ids]
    assert set(np.asarray(ids)[res.order[:3]]) == set(np.flatnonzero(positive))
    # the index's fine maps are kept between queries and rebuilt when the index changes; with window R-MAC
    # scoring the short list's maps are not decoded at all
    fine = rr._fine[1]
    assert len(fine) == len(maps)
    read = []
    ctx2 = RerankContext(maps=lambda ids, sp: read.append(list(ids)) or [sparse[i] for i in ids],
                         all_ids=lambda: range(len(maps)), version=1,
                         window_rmac=dict(finalize=lambda L: np.stack([x.sum(0) for x in L]) if isinstance(L, list)
                                          else L.sum(0), query_global=q / np.linalg.norm(q)))
    again, _ = rr.rerank(q, qmap, ids, np.zeros(4), ctx2)
    assert rr._fine[1] is fine and read == []
    np.testing.assert_array_equal(again.boxes, res.boxes)
    rr.rerank(q, qmap, ids, np.zeros(4), RerankContext(maps=ctx.maps, all_ids=ctx.all_ids, version=2))
    assert rr._fine[1] is not fine
    # above its RAM budget the index's fine maps are not kept (said once), each query builds its short list's
    small = make_reranker("aml-c2f", g=4, top=2, ram_mb=0.001)
    with pytest.warns(UserWarning, match=r"exceed ram_mb=0.001 MB.*each query builds"):
        low, _ = small.rerank(q, qmap, ids, np.zeros(4), ctx)
    assert small._fine[1] is None
    np.testing.assert_array_equal(low.boxes, res.boxes)
    np.testing.assert_allclose(low.scores, res.scores, rtol=1e-12)
    # ... decoding only the maps the fine stage re-scores
    read.clear()
    ctx3 = RerankContext(maps=lambda ids, sp: read.append(list(ids)) or [sparse[i] for i in ids],
                         all_ids=lambda: range(len(maps)), version=1)
    with pytest.warns(UserWarning, match="exceed ram_mb"):
        make_reranker("aml-c2f", g=4, top=2, ram_mb=0.001, fine_top=2).rerank(q, qmap, ids, np.zeros(4), ctx3)
    assert len(read) == 2 and read[0] == list(range(len(maps))) and len(read[1]) == 2  # the store, then 2 maps
    # g "auto" (default): about 8 coarse cells along the median map's longer side
    from instance_search.rerank.aml_c2f import auto_g

    assert [auto_g([sh]) for sh in ((512, 48, 64), (2048, 24, 32), (512, 12, 9), (1, 3, 5))] == [8, 4, 2, 1]
    assert auto_g([(8, 10, 64), (8, 20, 64), (8, 30, 32)]) == 8 and auto_g([]) == 1
    auto = make_reranker("aml-c2f", top=2)
    auto.rerank(q, qmap, ids, np.zeros(4), ctx)
    assert auto._cache[1].g == auto_g([m.shape for m in maps])
    for bad in (0, "big", 1.5):
        with pytest.raises(ValueError, match="g must be"):
            make_reranker("aml-c2f", g=bad)
    # fine_top: the re-ranker's cascade option (default 200; "all")
    two, _ = make_reranker("aml-c2f", g=4, top=2, fine_top=2).rerank(q, qmap, ids, np.zeros(4), ctx)
    alln, _ = make_reranker("aml-c2f", g=4, top=2, fine_top="all").rerank(q, qmap, ids, np.zeros(4), ctx)
    np.testing.assert_array_equal(alln.boxes, res.boxes)
    np.testing.assert_array_equal(alln.order, res.order)
    assert (two.n_windows < res.n_windows).sum() == 2 and np.isnan(two.vectors).all(1).sum() == 2
    for bad in (0, "most", 2.5):
        with pytest.raises(ValueError, match="fine_top"):
            make_reranker("aml-c2f", fine_top=bad)
    with pytest.raises(ValueError, match="ram_mb"):
        make_reranker("aml-c2f", ram_mb=-1)
    with pytest.raises(ValueError, match="unknown option"):
        make_reranker("aml-c2f", radiuss=3)
