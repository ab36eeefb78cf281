"""Standard evaluation protocols of instance-level image retrieval.

Conventions (the same as the revisitop evaluation code, Radenovic et al. CVPR'18):

* ``ranks`` is an integer array of shape ``(n_database, n_queries)``: column ``q`` lists database indices
  in ranked order (best first) for query ``q``.  It may be truncated to the first ``k`` rows; positives
  not retrieved then contribute nothing to AP.
* ``scores`` is a float array of shape ``(n_queries, n_database)`` (higher = more similar); functions that
  accept either tell them apart by dtype (integer = ranks, floating = scores) and convert scores with
  :func:`ranks_from_scores`.
* ``gnd`` is a list with one dict per query holding index lists ``'ok'`` (positives) and ``'junk'``
  (images removed from the ranking before AP is computed, as if they were not in the database).

Average precision is revisitop's / INRIA Holidays' trapezoid rule (see :func:`compute_ap`); mean AP skips
queries without any positive (their AP is ``nan``), exactly as revisitop's ``compute_map`` does.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "compute_ap",
    "compute_map",
    "ranks_from_scores",
    "as_ranks",
    "classic_gnd",
    "revisited_gnd",
    "evaluate_revisited",
    "holidays_gnd",
    "holidays_map",
    "ukbench_ns_score",
    "ukbench_map",
    "iou",
    "iou_matrix",
    "pr_curve",
    "PROTOCOLS",
]

PROTOCOLS = ("easy", "medium", "hard")


# ----------------------------------------------------------------------------------------------------------
# Core: AP / mAP with revisitop semantics
# ----------------------------------------------------------------------------------------------------------

def compute_ap(ranks: Sequence[int] | np.ndarray, nres: int) -> float:
    """Average precision from the 0-based positions of the positives in a ranking (junk already removed).

    ``ranks`` must be sorted ascending; ``nres`` is the total number of positives of the query (positives
    missing from ``ranks`` contribute zero).  Each positive adds a trapezoid of width ``1/nres`` between
    the precision just before it and the precision at it: for the ``j``-th positive (0-based) found at
    position ``r``: ``p0 = 1 if r == 0 else j / r``, ``p1 = (j + 1) / (r + 1)``, ``ap += (p0 + p1) / (2 nres)``.
    This is the rule of revisitop's ``compute_ap`` and of the official INRIA Holidays script
    (``score_ap_from_ranks_1``).
    """
    r = np.asarray(ranks, dtype=np.float64).ravel()
    if nres <= 0:
        raise ValueError(f"compute_ap: nres must be positive, got {nres}")
    if r.size == 0:
        return 0.0
    j = np.arange(r.size, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(r == 0, 1.0, j / np.where(r == 0, 1.0, r))
    p1 = (j + 1.0) / (r + 1.0)
    return float(np.sum(p0 + p1) / (2.0 * nres))


def _index_array(x: Any) -> np.ndarray:
    if x is None:
        return np.empty(0, dtype=np.int64)
    return np.asarray(x, dtype=np.int64).ravel()


def compute_map(ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]],
                kappas: Sequence[int] = ()) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP and mean precision@k, revisitop's ``compute_map`` semantics.

    Returns ``(map, aps, pr, prs)``: mean AP over the queries that have at least one ``'ok'`` image,
    per-query AP (``nan`` for queries without positives), mean P@k for each ``kappas`` entry and the
    per-query P@k matrix ``(n_queries, len(kappas))``.

    Junk images are removed from each ranking before scoring.  P@k follows revisitop to the letter,
    including its quirk: the cut-off is ``min(k, position of the last retrieved positive)``, i.e.
    ``prs[q, j] = #(positives in the first kq) / kq`` with ``kq = min(k, max positive position)``
    (1-based, after junk removal).  A query whose positives are all absent from a truncated ranking gets
    AP 0 and P@k 0 (revisitop would fail there).  If every query is empty the mean is ``nan``.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"compute_map: ranks must be 2-D (n_database, n_queries), got shape {ranks.shape}")
    nq = len(gnd)
    if ranks.shape[1] != nq:
        raise ValueError(f"compute_map: ranks has {ranks.shape[1]} columns but gnd has {nq} queries "
                         "(ranks is (n_database, n_queries); transpose it?)")
    kappas = [int(k) for k in kappas]
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    pr = np.zeros(len(kappas))
    total = 0.0
    nempty = 0
    positions = np.arange(ranks.shape[0])
    for i in range(nq):
        ok = _index_array(gnd[i].get("ok"))
        if ok.size == 0:
            aps[i] = np.nan
            prs[i, :] = np.nan
            nempty += 1
            continue
        junk = _index_array(gnd[i].get("junk"))
        col = ranks[:, i]
        pos = positions[np.isin(col, ok)]
        if junk.size:
            jpos = positions[np.isin(col, junk)]
            # shift each positive up by the number of junk images ranked strictly before it
            pos = pos - np.searchsorted(jpos, pos, side="left")
        ap = compute_ap(pos, ok.size)
        aps[i] = ap
        total += ap
        if kappas:
            if pos.size:
                pos1 = pos + 1
                last = pos1.max()
                for j, k in enumerate(kappas):
                    kq = min(last, k)
                    prs[i, j] = np.count_nonzero(pos1 <= kq) / kq
            pr += prs[i, :]
    denom = nq - nempty
    if denom == 0:
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return total / denom, aps, pr / denom, prs


def ranks_from_scores(scores: np.ndarray) -> np.ndarray:
    """``(n_queries, n_database)`` similarities -> ``(n_database, n_queries)`` ranks, best first.

    Sorting is stable: ties keep database order (lower index first).  NaN scores go last.
    """
    s = np.asarray(scores)
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2:
        raise ValueError(f"ranks_from_scores: scores must be 2-D (n_queries, n_database), got {s.shape}")
    s = s.astype(np.float64, copy=False)
    key = np.where(np.isnan(s), np.inf, -s)
    return np.argsort(key, axis=1, kind="stable").T.astype(np.int64)


def as_ranks(ranks_or_scores: np.ndarray, n_database: int | None = None,
             n_queries: int | None = None) -> np.ndarray:
    """Integer input is taken as ranks ``(<= n_database, n_queries)``; floating input as scores
    ``(n_queries, n_database)`` and ranked.  Shapes are checked when the sizes are given."""
    x = np.asarray(ranks_or_scores)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of ranks (n_database, n_queries) or scores (n_queries, "
                         f"n_database), got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        r = x.astype(np.int64, copy=False)
        if n_queries is not None and r.shape[1] != n_queries:
            raise ValueError(f"ranks have shape {r.shape}; expected (n_database, {n_queries}) — integer arrays "
                             "are ranks with one column per query")
        if n_database is not None:
            if r.shape[0] > n_database:
                raise ValueError(f"ranks have {r.shape[0]} rows but the database has {n_database} images")
            if r.size and (r.min() < 0 or r.max() >= n_database):
                raise ValueError(f"ranks contain indices outside [0, {n_database})")
        return r
    if np.issubdtype(x.dtype, np.floating):
        if n_queries is not None and n_database is not None and x.shape != (n_queries, n_database):
            raise ValueError(f"scores have shape {x.shape}; expected (n_queries, n_database) = "
                             f"({n_queries}, {n_database})")
        return ranks_from_scores(x)
    raise TypeError(f"expected integer ranks or floating-point scores, got dtype {x.dtype}")


# ----------------------------------------------------------------------------------------------------------
# Oxford / Paris protocols
# ----------------------------------------------------------------------------------------------------------

def _gnd_entries(gnd: Any) -> list[Mapping[str, Any]]:
    if isinstance(gnd, Mapping) and "gnd" in gnd:
        gnd = gnd["gnd"]
    if isinstance(gnd, Mapping):
        return [gnd]
    return list(gnd)


def classic_gnd(gnd: Any) -> list[dict[str, np.ndarray]]:
    """Classic Oxford5k / Paris6k ground truth as ``[{'ok', 'junk'}]``.

    ``gnd`` is the loaded pickle (dict with ``'gnd'``), its ``'gnd'`` list, or one query's dict.  The
    revisitop pickles already merge the original *good* and *ok* lists into ``'ok'``; raw dicts with
    ``'good'`` and ``'ok'`` are merged here.  ``junk`` is the *junk* list.
    """
    out = []
    for g in _gnd_entries(gnd):
        ok = np.concatenate([_index_array(g.get("good")), _index_array(g.get("ok"))])
        out.append({"ok": ok, "junk": _index_array(g.get("junk"))})
    return out


def revisited_gnd(gnd: Any, protocol: str) -> list[dict[str, np.ndarray]]:
    """Revisited Oxford/Paris ground truth for one protocol, as in revisitop's ``example_evaluate``.

    easy: ok = easy, junk = junk + hard; medium: ok = easy + hard, junk = junk; hard: ok = hard,
    junk = junk + easy.
    """
    p = protocol.lower()
    p = {"e": "easy", "m": "medium", "h": "hard"}.get(p, p)
    if p not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    out = []
    for g in _gnd_entries(gnd):
        easy, hard, junk = (_index_array(g.get(k)) for k in ("easy", "hard", "junk"))
        if p == "easy":
            ok, jk = easy, np.concatenate([junk, hard])
        elif p == "medium":
            ok, jk = np.concatenate([easy, hard]), junk
        else:
            ok, jk = hard, np.concatenate([junk, easy])
        out.append({"ok": ok, "junk": jk})
    return out


def evaluate_revisited(ranks: np.ndarray, gnd: Any, kappas: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """revisitop's Easy / Medium / Hard evaluation.  Figures are percentages (x100) like revisitop prints.

    Returns ``{'map_easy', 'map_medium', 'map_hard', 'mp@K_easy', ..., 'queries_easy', ...}`` where
    ``queries_*`` counts the queries with at least one positive under that protocol (the others are
    skipped).
    """
    entries = _gnd_entries(gnd)
    ranks = np.asarray(ranks)
    out: dict[str, Any] = {}
    for p in PROTOCOLS:
        g = revisited_gnd(entries, p)
        m, aps, pr, _ = compute_map(ranks, g, kappas)
        out[f"map_{p}"] = float(m * 100)
        for k, v in zip(kappas, pr):
            out[f"mp@{k}_{p}"] = float(v * 100)
        out[f"queries_{p}"] = int(np.count_nonzero(~np.isnan(aps)))
    return out


# ----------------------------------------------------------------------------------------------------------
# INRIA Holidays
# ----------------------------------------------------------------------------------------------------------

def _holidays_id(name: Any) -> int:
    s = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    stem = s.split(".", 1)[0]
    try:
        return int(stem)
    except ValueError:
        raise ValueError(f"not a Holidays image name (expected a 6-digit id like 100000.jpg): {name!r}") from None


def holidays_gnd(names: Sequence[Any]) -> tuple[list[int], list[dict[str, np.ndarray]]]:
    """Holidays' file-name rule: image ``id`` is a query when ``id % 100 == 0``; its positives are the
    other images with the same ``id // 100``.  Returns ``(query database indices, gnd)`` where each gnd
    entry has ``junk = [the query itself]``, which is exactly the official "exclude the query from its
    own ranking"."""
    ids = np.array([_holidays_id(n) for n in names], dtype=np.int64)
    groups = ids // 100
    queries = [i for i, v in enumerate(ids) if v % 100 == 0]
    gnd = []
    for q in queries:
        same = np.flatnonzero(groups == groups[q])
        gnd.append({"ok": same[same != q], "junk": np.array([q], dtype=np.int64)})
    return queries, gnd


def holidays_map(ranks_or_scores: np.ndarray, names: Sequence[Any]) -> float:
    """Holidays mAP (fraction, not %) with the official protocol.

    ``names`` lists the database images (file names or paths; the id is the file stem).  Input is either
    scores ``(n_queries, n_database)`` / ranks ``(n_database, n_queries)`` with the queries in database
    order, or a full ``(n_database, n_database)`` score matrix / ranks with one column per database image
    (the query rows/columns are then picked out).

    The official ``holidays_map.py`` drops the query from its own result list and computes AP with
    ``score_ap_from_ranks_1``: a trapezoid per positive with ``precision_0 = ntp / rank`` (1 at rank 0)
    and ``precision_1 = (ntp + 1) / (rank + 1)`` -- the same formula as :func:`compute_ap`.  Removing the
    query is done by giving it as junk.  Queries without positives (impossible in full Holidays) are
    skipped.
    """
    n = len(names)
    queries, gnd = holidays_gnd(names)
    x = np.asarray(ranks_or_scores)
    if x.ndim != 2:
        raise ValueError(f"holidays_map: expected a 2-D array, got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        if x.shape[1] == n and len(queries) != n:
            x = x[:, queries]
        ranks = as_ranks(x, n, len(queries))
    else:
        if x.shape[0] == n and len(queries) != n:
            x = x[queries]
        ranks = as_ranks(x, n, len(queries))
    return compute_map(ranks, gnd)[0]


# ----------------------------------------------------------------------------------------------------------
# UKBench
# ----------------------------------------------------------------------------------------------------------

def ukbench_ns_score(ranks_or_scores: np.ndarray, groups: Sequence[int],
                     query_groups: Sequence[int] | None = None) -> float:
    """Nister-Stewenius score: mean number of same-group images among the top 4 (maximum 4.0).

    Every database image is a query and the query itself stays in the ranking (it is a database image
    and normally comes first), as in the standard protocol.  ``groups[i]`` is image ``i``'s object id
    (``index // 4`` for UKBench).  For a query set different from the database pass ``query_groups``.
    """
    groups = np.asarray(groups)
    qg = groups if query_groups is None else np.asarray(query_groups)
    ranks = as_ranks(ranks_or_scores, len(groups), len(qg))
    top = ranks[:4]
    return float(np.mean(np.sum(groups[top] == qg[None, :], axis=0)))


def ukbench_map(ranks_or_scores: np.ndarray, groups: Sequence[int], include_query: bool = True) -> float:
    """UKBench mAP (fraction) with every image a query.

    By default the query counts as one of its own positives (it is a database image, as in the N-S score);
    with ``include_query=False`` it is removed from its ranking (junk) and the other group members are
    the positives.
    """
    groups = np.asarray(groups)
    ranks = as_ranks(ranks_or_scores, len(groups), len(groups))
    gnd = []
    for q in range(len(groups)):
        same = np.flatnonzero(groups == groups[q])
        if include_query:
            gnd.append({"ok": same, "junk": np.empty(0, dtype=np.int64)})
        else:
            gnd.append({"ok": same[same != q], "junk": np.array([q])})
    return compute_map(ranks, gnd)[0]


# ----------------------------------------------------------------------------------------------------------
# Boxes and curves
# ----------------------------------------------------------------------------------------------------------

def iou(box_a: Sequence[float] | np.ndarray, box_b: Sequence[float] | np.ndarray) -> float | np.ndarray:
    """Intersection over union of ``(x1, y1, x2, y2)`` boxes (continuous coordinates, ``x2`` exclusive).

    Broadcasts over leading dimensions: ``(..., 4)`` with ``(..., 4)``; returns a float for two single
    boxes.  Degenerate boxes have zero area; the IoU of two empty boxes is 0.
    """
    a = np.asarray(box_a, dtype=np.float64)
    b = np.asarray(box_b, dtype=np.float64)
    if a.shape[-1] != 4 or b.shape[-1] != 4:
        raise ValueError("iou: boxes must have 4 coordinates (x1, y1, x2, y2)")
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[..., 2] - a[..., 0], 0, None) * np.clip(a[..., 3] - a[..., 1], 0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    if out.ndim == 0:
        return float(out)
    return out


def iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU: ``(N, 4)`` x ``(M, 4)`` -> ``(N, M)``."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    return np.asarray(iou(a[:, None, :], b[None, :, :])).reshape(len(a), len(b))


def pr_curve(ranked_ok_mask: Sequence[bool] | np.ndarray, nres: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision after each position of a ranking, for plots.

    ``ranked_ok_mask[i]`` tells whether the ``i``-th result (junk already removed) is a positive; ``nres``
    is the total number of positives (default: the number in the mask).  Returns two arrays of length
    ``len(mask)``: ``recall[i] = tp_i / nres`` and ``precision[i] = tp_i / (i + 1)``.
    """
    m = np.asarray(ranked_ok_mask, dtype=bool).ravel()
    tp = np.cumsum(m)
    n = int(m.sum()) if nres is None else int(nres)
    recall = tp / n if n > 0 else np.zeros(len(m))
    precision = tp / np.arange(1, len(m) + 1)
    return recall.astype(np.float64), precision.astype(np.float64)
