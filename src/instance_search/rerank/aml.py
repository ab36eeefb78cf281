"""Spatial re-ranking with approximate max-pooling localisation, AML (Tolias, Sicre & Jégou 2016, Sec. 6).

For every short-listed image, :func:`instance_search.ops.integral.aml_search` localises the query in the
image's conv map (cosine of the approximate region MAC with the query MAC, Eq. 4); the image is then re-scored
by the cosine between the localised region's vector and the query vector, optionally after PCA-whitening
both. By default the region's vector is its exact MAC (the approximation is only used to search; ``exact=False``
scores with the approximate vector ``f̃_R`` instead); when the first stage used R-MAC, the window's R-MAC
(regions pooled exactly from the map's non-zero cells) is compared with the query's R-MAC.

Boxes are ``(x, y, w, h)`` in map cells; :func:`cells_to_pixels` / :func:`pixels_to_cells` convert to and from
image pixels ``(x1, y1, x2, y2)`` by proportional scaling (cell ``i`` covers pixels
``[i·iw/W, (i+1)·iw/W)``; receptive-field size and padding are ignored).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from ..ops.integral import SparseMap, aml_search_batch, map_shape
from ..ops.normalize import l2n
from ..ops.pooling import rmac_regions

__all__ = ["RerankResult", "rerank_aml", "score_windows", "prepare_rerank", "cells_to_pixels", "pixels_to_cells",
           "cosine_scores", "region_vectors"]


class RerankResult(NamedTuple):
    """Result of a spatial re-ranking of a short list of ``N`` images (all arrays in short-list order)."""

    scores: np.ndarray  #: (N,) float64 new score of each short-listed image
    boxes: np.ndarray  #: (N, 4) int64 best region ``(x, y, w, h)`` in map cells
    order: np.ndarray  #: (N,) short-list indices sorted by new score, best first (ties: old score, then index)
    n_windows: np.ndarray  #: (N,) int64 windows evaluated per image
    #: (N, D) the L2-normalised vector each image was scored with (for QE); NaN rows for images a cascade
    #: did not re-score (aml-c2f beyond its ``fine_top``)
    vectors: np.ndarray | None = None


def as_float_tensor(v) -> torch.Tensor:
    """``v`` (numpy or torch) as a CPU tensor; integer and float16 inputs become float32."""
    t = v.detach().cpu() if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
    return t.to(torch.float32) if not t.is_floating_point() or t.dtype == torch.float16 else t


def _whiten(whitening, M: torch.Tensor) -> torch.Tensor:
    """Apply a whitening callable (or object with ``.transform``) to an (R, C) matrix → (R, D), as
    :func:`instance_search.ops.pooling.rmac` does."""
    fn = whitening.transform if hasattr(whitening, "transform") else whitening
    out = fn(M.to(torch.float32))
    out = out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))
    if out.ndim != 2 or out.shape[0] != M.shape[0]:
        raise ValueError(f"whitening must map an (R, C) matrix to (R, D), got {tuple(out.shape)}")
    return out.to(torch.float64)


def region_vectors(region_vecs, whitening: Callable | None = None) -> torch.Tensor:
    """``L2(W(L2 f))`` of each row of ``region_vecs`` (R, C), or ``L2 f`` without whitening: ``(R, D)`` float64."""
    R = as_float_tensor(region_vecs).to(torch.float64)
    R = R[None] if R.ndim == 1 else R
    R = l2n(R)
    return l2n(_whiten(whitening, R)) if whitening is not None else R


def cosine_scores(region_vecs, query_vec, whitening: Callable | None = None) -> torch.Tensor:
    """Cosine of each row of ``region_vecs`` (R, C) with ``query_vec`` (C,): ``(R,)`` float64.

    With ``whitening``: ``cos(L2(W(L2 f_R)), L2(W(L2 q)))`` (MAC → L2 → PCA-whitening → L2, Tolias Sec. 3).
    """
    return region_vectors(region_vecs, whitening) @ region_vectors(query_vec, whitening)[0]


def order_by_score(scores: np.ndarray, old, first: np.ndarray | None = None) -> np.ndarray:
    """Short-list indices by decreasing new ``scores``; ties by decreasing ``old`` score, then by index.
    ``first`` (N,) bool: those images come before all others (a cascade's re-scored ones), each part so ordered."""
    n = scores.shape[0]
    old = np.zeros(n) if old is None else np.asarray(old, dtype=np.float64).reshape(-1)
    if old.shape[0] != n:
        raise ValueError(f"shortlist_scores has {old.shape[0]} entries for {n} maps")
    keys = (np.arange(n), -old, -scores)
    return np.lexsort(keys if first is None else keys + (~np.asarray(first, bool),))


def _window_mac(X, box) -> torch.Tensor:
    """Exact MAC ``max_{p∈R} X(p)`` of window ``box = (x, y, w, h)`` of a dense map or a :class:`SparseMap`."""
    x, y, w, h = (int(v) for v in box)
    if isinstance(X, SparseMap):
        C, H, W = X.shape
        pos = np.asarray(X.position)
        yy, xx = pos // W, pos % W
        inside = (yy >= y) & (yy < y + h) & (xx >= x) & (xx < x + w)
        out = np.zeros(C, np.float32)
        np.maximum.at(out, np.asarray(X.channel)[inside], np.asarray(X.value, np.float32)[inside])
        return torch.from_numpy(out)
    return as_float_tensor(X)[:, y:y + h, x:x + w].amax(dim=(1, 2))


def rerank_aml(
    query_vec,
    maps: Sequence,
    shortlist_scores=None,
    alpha: float = 10.0,
    t: int = 3,
    s: float = 1.1,
    query_aspect: float | None = None,
    refine_steps: int = 3,
    refine_rounds: int = 15,
    whitening: Callable | None = None,
    exact: bool = True,
    finalize: Callable | None = None,
    query_global=None,
    levels: int = 3,
    finalize_batch: bool = False,
    verify: int = 8,
    progress: bool = False,
) -> RerankResult:
    """Re-rank a short list by AML localisation (Tolias et al. 2016, Sec. 6).

    ``query_vec``: (C,) MAC of the query (region); ``maps``: one non-negative (C, H, W) map per short-listed
    image (numpy or torch, float16 accepted, or a :class:`~instance_search.ops.integral.SparseMap` such as
    :func:`instance_search.index.compact.decode_sparse` returns — the fast way; sizes may differ — maps of
    equal size are searched together by :func:`instance_search.ops.integral.aml_search_batch`);
    ``shortlist_scores``: (N,) first-stage scores, only used to break ties in ``order``. ``t, s, query_aspect``
    (query width / height), ``refine_*``, ``alpha``: see :func:`instance_search.ops.integral.aml_search`;
    ``verify``: see :func:`~instance_search.ops.integral.aml_search_batch`.

    Scoring of the localised window:

    * with ``finalize`` and ``query_global`` (R-MAC filtering): the window's own R-MAC — the ``levels``-level
      R-MAC regions of the window, pooled exactly from the map's non-zeros (``f̃``, Eq. 3), turned into a
      global vector by ``finalize`` ((R, C) unnormalised region vectors → (D,) L2-normalised, e.g. the
      recipe's L2–whitening–sum–L2; with ``finalize_batch=True`` it is called once per map size with a list of
      (R_i, C) arrays and returns (n, D)) — against the query's R-MAC ``query_global``;
    * otherwise the window's MAC (exact by default, ``exact=False``: its approximation ``f̃_R``) against the
      query MAC, after ``whitening`` (callable or object with ``.transform``, (R, C) → (R, D)) when given.
    """
    q, maps, groups, qg, qw = prepare_rerank(query_vec, maps, finalize, query_global, whitening)
    n = len(maps)
    scores = np.zeros(n)
    boxes = np.zeros((n, 4), dtype=np.int64)
    counts = np.zeros(n, dtype=np.int64)
    vectors: list[np.ndarray | None] = [None] * n
    for (H, W), idx in groups.items():
        wins, sc, cnt, sp = aml_search_batch([maps[i] for i in idx], q.numpy(), t=t, s=s, alpha=alpha,
                                             refine_steps=refine_steps, refine_rounds=refine_rounds,
                                             query_aspect=query_aspect, verify=verify, progress=progress)
        boxes[idx], counts[idx] = wins, cnt
        score_windows(maps, idx, wins, sc, sp, q, scores, vectors, whitening=whitening, exact=exact,
                      finalize=finalize, query_global=qg, levels=levels, finalize_batch=finalize_batch, qw=qw)
    vecs = np.stack(vectors) if n and all(v is not None for v in vectors) else None
    return RerankResult(scores, boxes, order_by_score(scores, shortlist_scores), counts, vecs)


def prepare_rerank(query_vec, maps: Sequence, finalize: Callable | None, query_global, whitening: Callable | None):
    """Checked inputs of an AML re-ranking: ``(q (C,) tensor, maps (dense as float tensors, SparseMap as they
    are), groups {(H, W): [indices]}, query_global as float64 or None, whitened query or None)``."""
    q = as_float_tensor(query_vec).reshape(-1)
    if (finalize is None) != (query_global is None):
        raise ValueError("give both finalize and query_global (R-MAC of the window) or neither")
    maps = [m if isinstance(m, SparseMap) else as_float_tensor(m) for m in maps]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, X in enumerate(maps):
        shape = map_shape(X)
        if len(shape) != 3:
            raise ValueError(f"map {i} must be (C, H, W), got shape {shape}")
        if shape[0] != q.shape[0]:
            raise ValueError(f"map {i} has {shape[0]} channels, the query {q.shape[0]}")
        groups.setdefault(shape[1:], []).append(i)
    qg = None if query_global is None else np.asarray(query_global, dtype=np.float64).reshape(-1)
    qw = region_vectors(q, whitening)[0] if whitening is not None else None
    return q, maps, groups, qg, qw


@functools.lru_cache(maxsize=4096)
def _window_regions(h: int, w: int, levels: int) -> np.ndarray:
    """:func:`~instance_search.ops.pooling.rmac_regions` of an ``h`` × ``w`` window (read-only, cached)."""
    r = np.asarray(rmac_regions(h, w, levels=levels))
    r.setflags(write=False)
    return r


def score_windows(maps: Sequence, idx: Sequence[int], wins: np.ndarray, sc: np.ndarray, sp, q: torch.Tensor,
                  scores: np.ndarray, vectors: list, whitening: Callable | None = None, exact: bool = True,
                  finalize: Callable | None = None, query_global=None, levels: int = 3, finalize_batch: bool = False,
                  qw: torch.Tensor | None = None) -> None:
    """Score the localised windows ``wins`` (n, 4) of the same-size maps ``maps[idx]`` (Tolias et al. 2016,
    Sec. 6), writing ``scores[idx]`` and ``vectors[idx]`` in place; ``sc`` their Eq. 4 search scores, ``sp``
    the :class:`~instance_search.ops.integral.SparseBatch` they were searched in. See :func:`rerank_aml` for
    the three ways (window R-MAC with ``finalize``, exact or approximate MAC, optionally whitened)."""
    qg = query_global
    if whitening is not None and qw is None:
        qw = region_vectors(q, whitening)[0]
    if finalize is not None:
        # windows of one size share their regions (up to a shift), between queries too
        regs = [_window_regions(int(h), int(w), int(levels)) + np.array([x, y, 0, 0]) for x, y, w, h in wins]
        R = max(len(r) for r in regs)
        padded = np.stack([np.concatenate([r, np.repeat(r[:1], R - len(r), 0)]) for r in regs])
        vecs = sp.window_vectors(padded).numpy()
        local = [vecs[k, :len(r)] for k, r in enumerate(regs)]
        if finalize_batch:
            G = np.asarray(finalize(local), dtype=np.float64).reshape(len(idx), -1)
        else:
            G = np.stack([np.asarray(finalize(L), dtype=np.float64).reshape(-1) for L in local])
        if G.shape[1] != qg.shape[0]:
            raise ValueError(f"finalize gave {G.shape[1]} dimensions, query_global has {qg.shape[0]}")
        scores[idx] = G @ qg
        for k, i in enumerate(idx):
            vectors[i] = G[k]
    elif exact or whitening is not None:
        if exact:
            V = torch.stack([_window_mac(maps[i], wins[k]) for k, i in enumerate(idx)])
        else:
            V = sp.window_vectors(wins[:, None, :])[:, 0]
        rv = region_vectors(V, whitening)
        scores[idx] = (rv @ (qw if qw is not None else region_vectors(q)[0])).numpy()
        for k, i in enumerate(idx):
            vectors[i] = rv[k].numpy()
    else:
        scores[idx] = sc


def cells_to_pixels(box, map_hw: tuple[int, int], image_wh: tuple[float, float]) -> np.ndarray:
    """Map-cell box(es) ``(x, y, w, h)`` → image-pixel box(es) ``(x1, y1, x2, y2)`` (float64, end-exclusive):
    ``x1 = x·iw/W``, ``x2 = (x+w)·iw/W`` and likewise for ``y`` with ``ih/H``. ``box``: (4,) or (N, 4)."""
    b = np.asarray(box, dtype=np.float64)
    H, W = map_hw
    iw, ih = image_wh
    sx, sy = iw / W, ih / H
    return np.stack([b[..., 0] * sx, b[..., 1] * sy, (b[..., 0] + b[..., 2]) * sx, (b[..., 1] + b[..., 3]) * sy], -1)


def pixels_to_cells(box_xyxy, image_wh: tuple[float, float], map_hw: tuple[int, int]) -> np.ndarray:
    """Image-pixel box(es) ``(x1, y1, x2, y2)`` → the smallest map-cell box(es) ``(x, y, w, h)`` (int64) that
    cover them, clipped to the map and at least one cell wide/high. ``box_xyxy``: (4,) or (N, 4)."""
    b = np.asarray(box_xyxy, dtype=np.float64)
    H, W = map_hw
    iw, ih = image_wh
    x1 = np.clip(np.floor(b[..., 0] * W / iw + 1e-9), 0, W - 1)
    y1 = np.clip(np.floor(b[..., 1] * H / ih + 1e-9), 0, H - 1)
    x2 = np.clip(np.ceil(b[..., 2] * W / iw - 1e-9), x1 + 1, W)
    y2 = np.clip(np.ceil(b[..., 3] * H / ih - 1e-9), y1 + 1, H)
    return np.stack([x1, y1, x2 - x1, y2 - y1], -1).astype(np.int64)
