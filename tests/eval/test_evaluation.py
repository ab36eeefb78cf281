"""Evaluation protocols: checked against slow, obviously-correct references and hand-computed examples."""
from __future__ import annotations

import math

import numpy as np
import pytest

from instance_search.eval import metrics as ev


# ---------------------------------------------------------------------------------------------- references

def ref_ap_and_pk(ranking, ok, junk, kappas):
    """Plain-python AP (trapezoid rule) and revisitop P@k for one query."""
    nres = len(ok)
    ok, junk = set(ok), set(junk)
    cleaned = [x for x in ranking if x not in junk]  # (ok and junk are disjoint here)
    ap = 0.0
    ntp = 0
    positions = []
    for r, x in enumerate(cleaned):
        if x in ok:
            p0 = 1.0 if r == 0 else ntp / r
            p1 = (ntp + 1) / (r + 1)
            ap += (p0 + p1) / 2 / nres
            ntp += 1
            positions.append(r + 1)
    pk = []
    for k in kappas:
        if not positions:
            pk.append(0.0)
            continue
        kq = min(max(positions), k)
        pk.append(sum(1 for p in positions if p <= kq) / kq)
    return ap, pk


def ref_map(ranks, gnd, kappas):
    aps, pks = [], []
    for q, g in enumerate(gnd):
        if len(g["ok"]) == 0:
            aps.append(float("nan"))
            pks.append([float("nan")] * len(kappas))
            continue
        ap, pk = ref_ap_and_pk(list(ranks[:, q]), list(g["ok"]), list(g["junk"]), kappas)
        aps.append(ap)
        pks.append(pk)
    valid = [a for a in aps if not math.isnan(a)]
    m = sum(valid) / len(valid)
    pr = [sum(p[j] for p, a in zip(pks, aps) if not math.isnan(a)) / len(valid) for j in range(len(kappas))]
    return m, aps, pr, pks


def random_case(rng, n_db, n_q, truncate=None):
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    if truncate:
        ranks = ranks[:truncate]
    gnd = []
    for q in range(n_q):
        perm = rng.permutation(n_db)
        n_ok = int(rng.integers(0, 8)) if q % 5 else 0
        n_junk = int(rng.integers(0, 6))
        gnd.append({"ok": perm[:n_ok], "junk": perm[n_ok:n_ok + n_junk]})
    return ranks, gnd


# ---------------------------------------------------------------------------------------------- compute_ap / map

def test_compute_ap_hand_examples():
    # ranking p n p, 2 positives: (1+1)/4 + (1/2+2/3)/4 = 0.5 + 7/24
    assert ev.compute_ap([0, 2], 2) == pytest.approx(0.5 + 7 / 24)
    # single positive at rank 0 of 1 -> 1.0; perfect ranking -> 1.0
    assert ev.compute_ap([0], 1) == 1.0
    assert ev.compute_ap([0, 1, 2, 3], 4) == pytest.approx(1.0)
    # positive at position 1: p0 = 0/1, p1 = 1/2 -> 0.25
    assert ev.compute_ap([1], 1) == pytest.approx(0.25)
    # a positive that was never retrieved counts as zero
    assert ev.compute_ap([0], 2) == pytest.approx(0.5)
    assert ev.compute_ap([], 3) == 0.0


def test_compute_map_hand_example_with_junk():
    # database 0..5; ranking: 5(junk) 1(neg) 0(pos) 4(junk) 2(pos) 3(neg)
    ranks = np.array([[5, 1, 0, 4, 2, 3]]).T
    gnd = [{"ok": [0, 2], "junk": [5, 4]}]
    m, aps, pr, prs = ev.compute_map(ranks, gnd, kappas=[1, 2, 5])
    # after junk removal: 1 0 2 3 -> positives at 1, 2: 1/4 * (0 + 1/2) + 1/4 * (1/2 + 2/3) = 5/12
    assert m == pytest.approx(5 / 12)
    assert aps[0] == pytest.approx(5 / 12)
    # P@1 = 0/1; P@2 = 1/2; P@5 -> kq = min(3, 5) = 3 -> 2/3 (revisitop's cut at the last positive)
    assert prs[0] == pytest.approx([0.0, 0.5, 2 / 3])
    assert pr == pytest.approx([0.0, 0.5, 2 / 3])


def test_compute_map_skips_empty_queries():
    ranks = np.array([[0, 1, 2], [0, 1, 2]]).T
    gnd = [{"ok": [0], "junk": []}, {"ok": [], "junk": [1]}]
    m, aps, pr, prs = ev.compute_map(ranks, gnd, kappas=[1])
    assert m == 1.0 and aps[0] == 1.0 and math.isnan(aps[1])
    assert pr == pytest.approx([1.0]) and math.isnan(prs[1, 0])
    m, aps, pr, _ = ev.compute_map(ranks[:, 1:], gnd[1:], kappas=[1])
    assert math.isnan(m)


@pytest.mark.parametrize("seed", range(6))
def test_compute_map_matches_reference_on_random_rankings(seed):
    rng = np.random.default_rng(seed)
    n_db = int(rng.integers(5, 60))
    truncate = int(rng.integers(1, n_db)) if seed % 2 else None
    ranks, gnd = random_case(rng, n_db, 25, truncate)
    kappas = [1, 3, 5, 10]
    m, aps, pr, prs = ev.compute_map(ranks, gnd, kappas)
    rm, raps, rpr, rprs = ref_map(ranks, gnd, kappas)
    assert m == pytest.approx(rm, abs=1e-12)
    np.testing.assert_allclose(aps, raps, atol=1e-12)
    np.testing.assert_allclose(pr, rpr, atol=1e-12)
    np.testing.assert_allclose(prs, np.array(rprs), atol=1e-12)


def test_ranks_from_scores_descending_and_stable():
    s = np.array([[0.1, 0.9, 0.5, 0.9], [3, 2, 1, 0]], dtype=np.float32)
    r = ev.ranks_from_scores(s)
    assert r.shape == (4, 2)
    assert r[:, 0].tolist() == [1, 3, 2, 0]  # tie 1/3 keeps database order
    assert r[:, 1].tolist() == [0, 1, 2, 3]
    assert ev.ranks_from_scores(np.array([[np.nan, 1.0, 2.0]]))[:, 0].tolist() == [2, 1, 0]


def test_as_ranks_validates():
    with pytest.raises(ValueError):
        ev.as_ranks(np.zeros((3, 4), dtype=np.float32), n_database=3, n_queries=4)
    with pytest.raises(ValueError):
        ev.as_ranks(np.array([[0], [7]]), n_database=5, n_queries=1)
    r = ev.as_ranks(np.array([[0.0, 1.0]]), 2, 1)
    assert r[:, 0].tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------- protocols

def test_classic_and_revisited_gnd():
    raw = {"gnd": [{"easy": [1, 2], "hard": [3], "junk": [4], "bbx": [0, 0, 1, 1]}]}
    e, = ev.revisited_gnd(raw, "easy")
    m, = ev.revisited_gnd(raw["gnd"], "medium")
    h, = ev.revisited_gnd(raw["gnd"][0], "H")
    assert sorted(e["ok"]) == [1, 2] and sorted(e["junk"]) == [3, 4]
    assert sorted(m["ok"]) == [1, 2, 3] and sorted(m["junk"]) == [4]
    assert sorted(h["ok"]) == [3] and sorted(h["junk"]) == [1, 2, 4]
    with pytest.raises(ValueError):
        ev.revisited_gnd(raw, "extreme")
    c, = ev.classic_gnd({"gnd": [{"ok": [5, 6], "junk": [7]}]})
    assert sorted(c["ok"]) == [5, 6] and list(c["junk"]) == [7]
    c, = ev.classic_gnd([{"good": [1], "ok": [2], "junk": []}])
    assert sorted(c["ok"]) == [1, 2] and len(c["junk"]) == 0


def test_evaluate_revisited_matches_compute_map():
    rng = np.random.default_rng(3)
    n_db, n_q = 40, 8
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    gnd = []
    for q in range(n_q):
        p = rng.permutation(n_db)
        ne = 0 if q == 0 else int(rng.integers(1, 5))
        nh = 0 if q == 1 else int(rng.integers(1, 5))
        gnd.append({"easy": p[:ne], "hard": p[ne:ne + nh], "junk": p[ne + nh:ne + nh + 3]})
    res = ev.evaluate_revisited(ranks, {"gnd": gnd}, kappas=(1, 5))
    for prot, key in (("easy", "easy"), ("medium", "medium"), ("hard", "hard")):
        g = [{"ok": list(x["easy"]) * (prot != "hard") + list(x["hard"]) * (prot != "easy"),
              "junk": list(x["junk"]) + (list(x["hard"]) if prot == "easy" else [])
              + (list(x["easy"]) if prot == "hard" else [])} for x in gnd]
        m, _, pr, _ = ref_map(ranks, g, [1, 5])
        assert res[f"map_{key}"] == pytest.approx(100 * m)
        assert res[f"mp@5_{key}"] == pytest.approx(100 * pr[1])
    assert res["queries_easy"] == 7 and res["queries_hard"] == 7 and res["queries_medium"] == 8


def official_holidays_map(names, ranked_names):
    """Transcription of the logic of INRIA's holidays_map.py (query skipped, score_ap_from_ranks_1)."""
    def ap_from_ranks(tp_ranks, nres):
        ap = 0.0
        step = 1.0 / nres
        for ntp, rank in enumerate(tp_ranks):
            p0 = 1.0 if rank == 0 else ntp / float(rank)
            p1 = (ntp + 1) / float(rank + 1)
            ap += (p1 + p0) * step / 2.0
        return ap

    ids = {n: int(n.split(".")[0]) for n in names}
    total, nq = 0.0, 0
    for q, results in ranked_names.items():
        gt = [n for n in names if ids[n] // 100 == ids[q] // 100 and n != q]
        tp_ranks, shift = [], 0
        for rank, r in enumerate(results):
            if r == q:
                shift = -1
            elif r in gt:
                tp_ranks.append(rank + shift)
        total += ap_from_ranks(tp_ranks, len(gt))
        nq += 1
    return total / nq


def test_holidays_map_matches_official_rule():
    rng = np.random.default_rng(0)
    names = []
    for g in range(1000, 1012):
        names += [f"{g}{k:02d}.jpg" for k in range(int(rng.integers(2, 5)))]
    n = len(names)
    queries = [i for i, s in enumerate(names) if int(s[:6]) % 100 == 0]
    scores = rng.random((len(queries), n))
    scores[np.arange(len(queries)), queries] += 0.3 * rng.random(len(queries))  # query sometimes not first
    ranks = ev.ranks_from_scores(scores)
    ranked = {names[q]: [names[i] for i in ranks[:, j]] for j, q in enumerate(queries)}
    expected = official_holidays_map(names, ranked)
    assert ev.holidays_map(scores, names) == pytest.approx(expected)
    assert ev.holidays_map(ranks, names) == pytest.approx(expected)
    full = rng.random((n, n))
    full[queries] = scores
    assert ev.holidays_map(full, names) == pytest.approx(expected)
    # perfect: query first, then its group
    qs, gnd = ev.holidays_gnd(names)
    assert len(qs) == 12 and all(len(g["ok"]) >= 1 for g in gnd)


def test_ukbench_ns_and_map():
    groups = np.arange(12) // 4
    perfect = np.stack([np.r_[np.flatnonzero(groups == groups[q]), np.flatnonzero(groups != groups[q])]
                        for q in range(12)], axis=1)
    assert ev.ukbench_ns_score(perfect, groups) == 4.0
    assert ev.ukbench_map(perfect, groups) == pytest.approx(1.0)
    # query first, then three non-members, then its 3 group members: only the query is in the top 4
    cols = []
    for q in range(12):
        others = [i for i in range(12) if groups[i] != groups[q]]
        members = [i for i in range(12) if groups[i] == groups[q] and i != q]
        cols.append([q] + others[:3] + members + others[3:])
    ranks = np.array(cols).T
    assert ev.ukbench_ns_score(ranks, groups) == 1.0
    # AP of one query: positives at 0, 4, 5, 6 of 4 -> trapezoids
    ap = (2 + (1 / 4 + 2 / 5) + (2 / 5 + 3 / 6) + (3 / 6 + 4 / 7)) / 8
    assert ev.ukbench_map(ranks, groups) == pytest.approx(ap)
    # identical via scores
    s = -np.argsort(perfect, axis=0).T.astype(np.float64)  # score = -position
    assert ev.ukbench_ns_score(s, groups) == 4.0
    # map with the query excluded
    assert ev.ukbench_map(perfect, groups, include_query=False) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- boxes, curves

def test_iou():
    assert ev.iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert ev.iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert ev.iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert ev.iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    assert isinstance(ev.iou([0, 0, 1, 1], [0, 0, 1, 2]), float)
    rng = np.random.default_rng(1)
    a = np.sort(rng.random((5, 2, 2)) * 10, axis=1).transpose(0, 2, 1).reshape(5, 4)[:, [0, 2, 1, 3]]
    b = np.sort(rng.random((7, 2, 2)) * 10, axis=1).transpose(0, 2, 1).reshape(7, 4)[:, [0, 2, 1, 3]]
    m = ev.iou_matrix(a, b)
    assert m.shape == (5, 7)
    for i in range(5):
        for j in range(7):
            assert m[i, j] == pytest.approx(ev.iou(a[i], b[j]))
            assert m[i, j] == pytest.approx(ev.iou(b[j], a[i]))
    np.testing.assert_allclose(ev.iou(a, a), 1.0)


def test_pr_curve():
    rec, prec = ev.pr_curve([True, False, True, False])
    np.testing.assert_allclose(rec, [0.5, 0.5, 1, 1])
    np.testing.assert_allclose(prec, [1, 0.5, 2 / 3, 0.5])
    rec, _ = ev.pr_curve([True, False], nres=4)
    np.testing.assert_allclose(rec, [0.25, 0.25])
