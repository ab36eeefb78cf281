"""Re-rankers and query expansions behind one interface each, with registries (the guide's
``short list ─▶ Reranker ─▶ QE`` steps).

* :class:`Reranker` re-orders a short list of the first-stage ranking and gives each short-listed image a box:
  ``none``, ``aml`` (Tolias, Sicre & Jégou 2016, Sec. 6), ``aml-fast`` (:mod:`.aml_fast`), ``aml-c2f``
  (:mod:`.aml_c2f`), ``casr`` (Salvador et al. 2016, Sec. 3.3, class-agnostic), ``cs-sr`` (Salvador et al.
  2016, Sec. 3.3, class-specific: a detector fine-tuned on the query instances, given by file, option
  ``detector``).
* :class:`Expansion` turns the ranked list into a new query (query side) and/or transforms the database
  vectors (database side): ``avg`` (average QE, Chum et al. 2007; Tolias et al. 2016 Sec. 6), ``alpha``
  (α-QE, Radenović, Tolias & Chum 2018, α = 3), ``dba`` (database-side augmentation, Arandjelović & Zisserman
  2012, α-weighted as in Radenović et al. 2018).

A re-ranker sees only the query (global vector and conv map) and the short list's ids and scores; what it needs
from the index (stored conv maps, the whitening, how a window is scored) comes in a :class:`RerankContext` that
:mod:`instance_search.search` builds, so nothing here imports the collection. Names are created with
:func:`make_reranker` / :func:`make_expansion`, which refuse unknown names and options naming the choices.
"""
from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Hashable, Sequence

import numpy as np

from ..ops.integral import map_shape
from .aml import RerankResult, rerank_aml
from .aml_c2f import (DEFAULT_FINE_TOP, DEFAULT_TOP, AMLFineMaps, FineMapsBuilder, auto_g, positive_int,
                      rerank_aml_c2f)
from .aml_fast import DEFAULT_G, DEFAULT_K, DEFAULT_STEP, AMLInvertedMaps, rerank_aml_fast
from .expansion import alpha_qe, average_qe, dba

__all__ = ["Reranker", "Expansion", "RerankContext", "RERANKERS", "EXPANSIONS", "register_reranker",
           "register_expansion", "make_reranker", "make_expansion", "reranker_names", "expansion_names"]


@dataclass
class RerankContext:
    """What a re-ranker may read from the index, handed in by :mod:`instance_search.search`.

    ``maps(ids, sparse)``: the stored conv maps (C, H, W) of those image ids, in order (``sparse=True``: the
    non-zero cells only, as :class:`~instance_search.ops.integral.SparseMap`); ``all_ids()``: every indexed id;
    ``version``: changes whenever the indexed maps do (cache key); ``whitening``: the index's PCA-whitening or
    ``None``; ``window_rmac``: keyword arguments of :func:`~.aml.rerank_aml` that score a window by its R-MAC
    (empty: by its MAC)."""

    maps: Callable[[Sequence[int], bool], list]
    all_ids: Callable[[], Sequence[int]]
    version: Hashable = None
    whitening: Any = None
    window_rmac: dict[str, Any] = field(default_factory=dict)


class _Options:
    """Options accepted by a registered class (``options``: name → default); others are refused by name."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ValueError(f"{self.kind} {self.name!r}: unknown option(s) {', '.join(map(repr, unknown))} "
                             f"(accepted: {known})")
        self.opts = {**self.options, **{k: v for k, v in options.items() if v is not None}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.opts.items())})"


class Reranker(_Options, ABC):
    """Re-orders a short list. ``identity``: does nothing (no maps read, the first-stage list is the answer);
    ``window_vectors``: the ``vectors`` of its result live in the query's global-vector space when the context
    scores windows like the recipe (then query expansion uses them, Tolias et al. 2016 Sec. 6)."""

    kind = "re-ranking"
    identity: ClassVar[bool] = False
    window_vectors: ClassVar[bool] = False

    @abstractmethod
    def rerank(self, qvec: np.ndarray, qmap: np.ndarray, ids: Sequence[int], scores: np.ndarray,
               ctx: RerankContext) -> tuple[RerankResult, list[tuple[int, int]]]:
        """``(result, map (H, W) of each short-listed image)``: ``qvec`` the query's global vector, ``qmap`` its
        (C, H, W) conv map, ``ids`` / ``scores`` the short list (best first); boxes of the result in the cells
        of those maps."""

    def qe_after_rerank(self, qmap: np.ndarray, ids: Sequence[int], scores: np.ndarray, result: RerankResult,
                        top: int, ctx: RerankContext) -> tuple[RerankResult, list[tuple[int, int]]] | None:
        """Average query expansion in this re-ranker's own region space after it re-ranked ``ids`` into
        ``result`` (with the ``top`` best), re-ranking the same short list again; ``None`` (the default): the
        re-ranker has none, and :mod:`instance_search.search` expands with global vectors."""
        return None


class Expansion(_Options, ABC):
    """Query expansion. ``expand`` (query side) returns the new query from the query and its ``n`` best
    neighbours' vectors, or ``None`` when the expansion works on the database side only; ``database`` (database
    side) returns the transformed database vectors, or ``None`` (the default) when it leaves them alone."""

    kind = "query expansion"

    def expand(self, q: np.ndarray, neighbours: np.ndarray) -> np.ndarray | None:
        return None

    def database(self, vectors: np.ndarray, neighbours: np.ndarray, n: int) -> np.ndarray | None:
        """Transform the database ``vectors`` (N, D), given each row's nearest ``neighbours`` (N, K) best
        first (itself included), with ``n`` neighbours per row."""
        return None

    @property
    def database_side(self) -> bool:
        return type(self).database is not Expansion.database

    @property
    def query_side(self) -> bool:
        return type(self).expand is not Expansion.expand


RERANKERS: dict[str, type[Reranker]] = {}
EXPANSIONS: dict[str, type[Expansion]] = {}


def register_reranker(cls: type[Reranker]) -> type[Reranker]:
    if cls.name in RERANKERS:
        raise ValueError(f"re-ranking {cls.name!r} is registered twice")
    RERANKERS[cls.name] = cls
    return cls


def register_expansion(cls: type[Expansion]) -> type[Expansion]:
    if cls.name in EXPANSIONS:
        raise ValueError(f"query expansion {cls.name!r} is registered twice")
    EXPANSIONS[cls.name] = cls
    return cls


def reranker_names() -> list[str]:
    return list(RERANKERS)


def expansion_names() -> list[str]:
    return list(EXPANSIONS)


def make_reranker(name: str | None, **options: Any) -> Reranker:
    """The re-ranker registered as ``name`` (``None``: ``"none"``) with ``options``; unknown names and options
    are refused naming the choices."""
    cls = RERANKERS.get("none" if name is None else str(name))
    if cls is None:
        raise ValueError(f"unknown re-ranking {name!r}; choose one of: {', '.join(RERANKERS)}")
    return cls(**options)


def make_expansion(name: str, **options: Any) -> Expansion:
    """The query expansion registered as ``name`` with ``options`` (unknown ones refused naming the choices)."""
    cls = EXPANSIONS.get(str(name))
    if cls is None:
        raise ValueError(f"unknown query expansion {name!r}; choose one of: {', '.join(EXPANSIONS)}")
    return cls(**options)


# ------------------------------------------------------------------------------------------------ re-rankers
def _query_mac(qmap) -> np.ndarray:
    return np.asarray(qmap, np.float32).max(axis=(1, 2))


def _aspect(qmap) -> float:
    return qmap.shape[2] / qmap.shape[1]


@register_reranker
class NoRerank(Reranker):
    """The first-stage ranking as it is."""

    name = "none"
    identity = True

    def rerank(self, qvec, qmap, ids, scores, ctx):
        raise RuntimeError("the 'none' re-ranking re-ranks nothing; check Reranker.identity first")


@register_reranker
class AML(Reranker):
    """AML (Tolias, Sicre & Jégou 2016, Sec. 6): localise the query's MAC in each short-listed map by
    approximate max-pooling localisation (Eq. 4) and score the localised window (its MAC, or its R-MAC when the
    context says so); :func:`~.aml.rerank_aml`."""

    name = "aml"
    window_vectors = True

    def rerank(self, qvec, qmap, ids, scores, ctx):
        maps = ctx.maps(ids, True)  # the maps' non-zero cells, decoded without building dense maps
        shapes = [tuple(int(v) for v in m.shape[1:]) for m in maps]
        res = rerank_aml(_query_mac(qmap), maps, shortlist_scores=scores, query_aspect=_aspect(qmap),
                         whitening=ctx.whitening, **ctx.window_rmac)
        return res, shapes


@register_reranker
class AMLFast(Reranker):
    """AML on coarse max-pooled maps and the query's ``K`` strongest channels (:mod:`.aml_fast`): options ``K``
    (query channels), ``g`` (pooling factor), ``step`` (window step in coarse cells), ``pooling`` and ``score``
    (see :func:`~.aml_fast.rerank_aml_fast`). The coarse inverted maps
    of the whole index are built on first use (and again when the index changes) and kept in memory."""

    name = "aml-fast"
    options = {"K": DEFAULT_K, "g": DEFAULT_G, "step": DEFAULT_STEP, "pooling": "max", "score": "mac"}

    def __init__(self, **options):
        super().__init__(**options)
        self._cache: tuple[Hashable, Any, dict[int, int]] | None = None

    def _store(self, ctx: RerankContext) -> tuple[AMLInvertedMaps, dict[int, int]]:
        """The coarse inverted maps of the whole index (built on first use and when the index changes)."""
        g = int(self.opts["g"])
        key = (g, ctx.version)
        if self._cache is None or self._cache[0] != key:
            all_ids = [int(i) for i in ctx.all_ids()]
            step = 4096  # decode a chunk of maps at a time
            maps = (m for i in range(0, len(all_ids), step) for m in ctx.maps(all_ids[i:i + step], True))
            inv = AMLInvertedMaps.build(maps, g=g, progress=len(all_ids) > 1000, total=len(all_ids))
            self._cache = (key, inv, {i: r for r, i in enumerate(all_ids)})
        return self._cache[1], self._cache[2]

    def rerank(self, qvec, qmap, ids, scores, ctx):
        inv, row_of = self._store(ctx)
        rows = np.asarray([row_of[int(i)] for i in ids], np.int64)
        res = rerank_aml_fast(_query_mac(qmap), inv, rows, shortlist_scores=scores, query_aspect=_aspect(qmap),
                              whitening=ctx.whitening, K=int(self.opts["K"]), step=int(self.opts["step"]),
                              pooling=str(self.opts["pooling"]), score=str(self.opts["score"]))
        return res, [tuple(int(v) for v in inv.shapes[r]) for r in rows]


@register_reranker
class AMLCoarseToFine(AMLFast):
    """Coarse-to-fine AML (:mod:`.aml_c2f`): ``aml-fast``'s coarse search proposes the ``top`` best windows of
    each short-listed map, exact AML (Eq. 3-4, α = 10) scores the grid windows within ``radius`` cells of them
    (default: ``g``) and refines the best; the window is scored as ``aml`` scores it. Options of ``aml-fast``
    (``K``, ``g``, ``step``) for the coarse search (``g`` by default ``"auto"``: :func:`~.aml_c2f.auto_g` of the
    index's maps, 8 on 1024-px VGG16 maps, 4 on ResNet-50's), plus ``top`` and ``radius``; ``fine_top`` (200, or
    ``"all"``): only the maps with the best coarse windows go through the fine stage, the others follow with their
    coarse scores (:func:`~.aml_c2f.rerank_aml_c2f`); ``ram_mb``: see :meth:`_store`."""

    name = "aml-c2f"
    window_vectors = True
    options = {"K": DEFAULT_K, "g": "auto", "step": DEFAULT_STEP, "top": DEFAULT_TOP, "radius": None,
               "fine_top": DEFAULT_FINE_TOP, "ram_mb": 2048}

    def __init__(self, **options):
        super().__init__(**options)
        if not float(self.opts["ram_mb"]) >= 0:
            raise ValueError(f"aml-c2f: ram_mb must be >= 0, got {self.opts['ram_mb']!r}")
        for name, word in (("fine_top", "all"), ("g", "auto")):
            v = self.opts[name]
            if v != word and not positive_int(v):
                raise ValueError(f"aml-c2f: {name} must be an integer >= 1 or \"{word}\", got {v!r}")
        self._fine: tuple[Hashable, AMLFineMaps | None] | None = None

    def _store(self, ctx: RerankContext) -> tuple[AMLInvertedMaps, dict[int, int]]:
        """The coarse inverted maps and the fine maps (:class:`~.aml_c2f.AMLFineMaps`, ~18 bytes per non-zero
        cell) of the whole index, from one decoding pass (built on first use and when the index changes). Fine
        maps above ``ram_mb`` MB are not kept (a warning says so): each query then decodes the maps its fine stage
        re-scores (``fine_top``) and builds theirs."""
        key = (self.opts["g"], ctx.version)
        if self._cache is None or self._cache[0] != key or self._fine is None or self._fine[0] != key:
            all_ids = [int(i) for i in ctx.all_ids()]
            budget = float(self.opts["ram_mb"]) * 2 ** 20
            fb: FineMapsBuilder | None = FineMapsBuilder()
            over = 0
            first = ctx.maps(all_ids[:4096], True)  # decode a chunk of maps at a time
            g = auto_g([map_shape(m) for m in first]) if self.opts["g"] == "auto" else int(self.opts["g"])

            def maps():
                nonlocal fb, over
                for i in range(0, len(all_ids), 4096):
                    for m in (first if i == 0 else ctx.maps(all_ids[i:i + 4096], True)):
                        if fb is not None:
                            fb.add(m)
                            if fb.nbytes > budget:
                                fb, over = None, len(fb.shapes)
                        yield m

            inv = AMLInvertedMaps.build(maps(), g=g, progress=len(all_ids) > 1000, total=len(all_ids))
            self._cache = (key, inv, {i: r for r, i in enumerate(all_ids)})
            self._fine = (key, fb.finish() if fb is not None and fb.shapes else None)
            if fb is None:
                warnings.warn(f"aml-c2f: the fine maps of this index's {len(all_ids)} images exceed ram_mb="
                              f"{self.opts['ram_mb']} MB (reached after {over} images); each query builds those of "
                              f"the maps it re-scores from their decoded maps instead (slower); a larger ram_mb keeps "
                              f"them in RAM", stacklevel=2)
        return self._cache[1], self._cache[2]

    def rerank(self, qvec, qmap, ids, scores, ctx):
        inv, row_of = self._store(ctx)
        rows = np.asarray([row_of[int(i)] for i in ids], np.int64)
        fine = self._fine[1]
        # scored by the window's R-MAC with the fine maps in RAM, the maps themselves are not read; else only
        # those of the maps the fine stage re-scores (fine_top) are decoded
        ids = [int(i) for i in ids]
        maps = None if fine is not None and ctx.window_rmac.get("finalize") is not None else \
            (lambda pos: ctx.maps([ids[int(p)] for p in pos], True))
        res = rerank_aml_c2f(_query_mac(qmap), maps, inv, rows, shortlist_scores=scores, query_aspect=_aspect(qmap),
                             top=int(self.opts["top"]), radius=self.opts["radius"], K=int(self.opts["K"]),
                             step=int(self.opts["step"]), whitening=ctx.whitening, fine=fine,
                             fine_top=None if self.opts["fine_top"] == "all" else int(self.opts["fine_top"]),
                             **ctx.window_rmac)
        return res, [tuple(int(v) for v in inv.shapes[r]) for r in rows]


@register_reranker
class CASR(Reranker):
    """CA-SR (Salvador et al. 2016, Sec. 3.3): each short-listed image takes the score and box of its best
    candidate window (multi-scale sliding windows, exact pooling); :func:`~.ca_sr.ca_sr`. Option ``vectors``
    (:data:`~.ca_sr.REGION_VECTORS`): ``max`` (the authors' ``pooling = 'max'``: max-pooled query box and
    windows, L2 only) or ``sum`` (sum-pooled, L2 → the index's PCA-whitening → L2, as the authors reuse the
    image-level PCA of IPA-sum; needs a whitened index) or ``max-whitened`` (max-pooled, L2 → the index's
    whitening → L2: the package's earlier variant; :mod:`.ca_sr`). ``max`` is the default on every index: on an
    R-MAC index ``max-whitened`` measured better on Paris-250 (box queries) but worse on Holidays-811 and
    UKBench-1000 (docs/results.md)."""

    name = "casr"
    options = {"vectors": "max"}

    def __init__(self, **options):
        super().__init__(**options)
        from .ca_sr import REGION_VECTORS

        if self.opts["vectors"] not in REGION_VECTORS:
            raise ValueError(f"casr: vectors must be one of {', '.join(REGION_VECTORS)}, got {self.opts['vectors']!r}")

    def _pooling(self, ctx) -> tuple[str, bool]:
        from .ca_sr import check_vectors

        return check_vectors(str(self.opts["vectors"]), ctx.whitening)

    def rerank(self, qvec, qmap, ids, scores, ctx):
        from .ca_sr import ca_sr, query_descriptor

        pooling, whiten = self._pooling(ctx)
        maps = ctx.maps(ids, False)
        shapes = [tuple(int(v) for v in m.shape[1:]) for m in maps]
        q = query_descriptor(np.asarray(qmap, np.float32), pooling)
        return ca_sr(q, maps, shortlist_scores=scores, whitening=ctx.whitening if whiten else None,
                     pooling=pooling), shapes

    def qe_after_rerank(self, qmap, ids, scores, result, top, ctx):
        """Salvador et al. 2016, Sec. 4.3: the mean of the raw query box vector and the raw re-cropped boxes of
        the ``top`` best, then CA-SR of the short list with it (:func:`~.ca_sr.ca_sr_qe`)."""
        from .ca_sr import ca_sr_qe, query_descriptor

        pooling, whiten = self._pooling(ctx)
        maps = ctx.maps(ids, False)
        q = query_descriptor(np.asarray(qmap, np.float32), pooling)
        return ca_sr_qe(q, maps, result, top, shortlist_scores=scores, whitening=ctx.whitening if whiten else None,
                        pooling=pooling), [tuple(int(v) for v in m.shape[1:]) for m in maps]


@register_reranker
class CSSR(Reranker):
    """CS-SR (Salvador et al. 2016, Sec. 3.3): a detector fine-tuned on the query instances (``isearch
    finetune``; option ``detector``: its file) scores the RPN proposals of each short-listed image's stored
    conv5_3 map for the query's class; the image takes the best probability and that proposal's class box.
    ``class``: the query's class name in the detector (default: the class the detector finds best in the query
    box itself); ``proposals``: RPN proposals per image (Salvador: 300); ``box``: the image's box is the best
    proposal as it is (``proposal``, default: the authors' ``use_regressed_boxes = False``) or its class-regressed
    box (``regressed``). The index must store VGG16 conv5_3 maps
    (the layer the detector reads); a detector whose conv5 was fine-tuned (strategy #2) would need pool4 maps
    and is refused."""

    name = "cs-sr"
    options = {"detector": None, "class": None, "proposals": 300, "box": "proposal"}

    def __init__(self, **options):
        super().__init__(**options)
        if self.opts["detector"] is None:
            raise ValueError("re-ranking 'cs-sr' needs a fine-tuned detector: give its file as option 'detector' "
                             "(`isearch search --detector FILE`; made by `isearch finetune`)")
        if int(self.opts["proposals"]) < 1:
            raise ValueError(f"cs-sr: proposals must be at least 1, got {self.opts['proposals']}")
        if self.opts["box"] not in ("proposal", "regressed"):
            raise ValueError(f"cs-sr: box must be 'proposal' or 'regressed', got {self.opts['box']!r}")
        self._det = None

    @property
    def detector(self):
        if self._det is None:
            from ..nets.detector import load_detector

            path = Path(self.opts["detector"])
            det, cfg = load_detector(path)
            if int(cfg.get("strategy", 1) or 1) == 2:
                raise ValueError(f"{path}: this detector's conv5 was fine-tuned (strategy #2); it reads pool4 maps, "
                                 f"but the index stores conv5_3 maps: use a strategy #1 detector")
            self._det = det
        return self._det

    def _class_index(self, qmap: np.ndarray) -> int:
        import torch

        det = self.detector
        cls = self.opts["class"]
        if cls is not None:
            if str(cls) not in det.classes:
                raise ValueError(f"cs-sr: class {cls!r} is not one of the detector's classes "
                                 f"({', '.join(det.classes[:20])}{' ...' if len(det.classes) > 20 else ''})")
            return det.classes.index(str(cls))
        from ..nets.detector import class_detections

        probs, _ = class_detections(det, torch.from_numpy(np.asarray(qmap, np.float32)), int(self.opts["proposals"]))
        return int(np.argmax(probs))

    def _check_map(self, m, what: str) -> None:
        c = int(self.detector.rpn.in_channels)
        if int(m.shape[0]) != c:
            raise ValueError(f"cs-sr: the {what} has {int(m.shape[0])} channels, the detector reads {c}-channel "
                             f"VGG16 conv5_3 maps (index the collection with --backbone vgg16 --layer conv5_3)")

    def rerank(self, qvec, qmap, ids, scores, ctx):
        import torch

        from .cs_sr import cs_sr

        self._check_map(qmap, "query's map")
        k = self._class_index(qmap)
        maps = [torch.from_numpy(np.asarray(m, np.float32)) for m in ctx.maps(ids, False)]
        for m in maps[:1]:
            self._check_map(m, "index's stored map")
        res = cs_sr(self.detector, k, maps, shortlist_scores=scores, proposals=int(self.opts["proposals"]),
                    whitening=ctx.whitening, box=str(self.opts["box"]))
        return res, [tuple(int(v) for v in m.shape[1:]) for m in maps]

    def qe_after_rerank(self, qmap, ids, scores, result, top, ctx):
        """Salvador et al. 2016, Sec. 4.3: the mean of the raw max-pooled query box vector and the raw re-cropped
        boxes of the ``top`` best, then CA-SR of the short list with it over the detector's RPN proposals
        (:func:`~.cs_sr.cs_sr_qe`)."""
        import torch

        from .ca_sr import query_descriptor
        from .cs_sr import cs_sr_qe

        maps = [torch.from_numpy(np.asarray(m, np.float32)) for m in ctx.maps(ids, False)]
        q = query_descriptor(np.asarray(qmap, np.float32), "max")
        return cs_sr_qe(self.detector, q, maps, result, top, int(self.opts["proposals"]), scores), \
            [tuple(int(v) for v in m.shape[1:]) for m in maps]


# ------------------------------------------------------------------------------------------------ expansions
@register_expansion
class AverageQE(Expansion):
    """Average query expansion (Chum et al. 2007, Sec. 3; Tolias et al. 2016, Sec. 6):
    ``q' = L2(q + Σ_{j≤n} x_j)`` over the ``n`` best results; :func:`~.expansion.average_qe`."""

    name = "avg"
    #: ``space``: after a re-ranker with its own region space (``casr``, ``cs-sr``), ``"regions"`` averages
    #: as Salvador et al. 2016, Sec. 4.3 (raw region vectors, short list re-ranked again:
    #: :meth:`Reranker.qe_after_rerank`); ``"global"`` averages the global vectors and searches again (the earlier
    #: path: better on UKBench-125, worse on Paris-250 Hard with IPA, docs/papers/salvador.md); ``"auto"``
    #: (default, :meth:`space_for`): ``"global"`` on a MAC / R-MAC index with a whitening (where it measured as
    #: good or better, docs/results.md), ``"regions"`` elsewhere (Salvador's IPA indexes)
    options = {"space": "auto"}
    SPACES = ("auto", "regions", "global")

    def __init__(self, **options):
        super().__init__(**options)
        if self.opts["space"] not in self.SPACES:
            raise ValueError(f"avg: space must be one of {', '.join(map(repr, self.SPACES))}, "
                             f"got {self.opts['space']!r}")

    def space_for(self, whitening, window_space: bool) -> str:
        """The space ``space`` names for an index (``"auto"`` resolved as the options say)."""
        if self.opts["space"] != "auto":
            return str(self.opts["space"])
        return "global" if whitening is not None and window_space else "regions"

    def expand(self, q, neighbours):
        return average_qe(q, neighbours, ranks=np.arange(len(neighbours)), top=len(neighbours))


@register_expansion
class AlphaQE(Expansion):
    """α-QE (Radenović, Tolias & Chum 2018, Sec. 5.1): ``q' = L2(q + Σ_{j≤n} max(qᵀx_j, 0)^α x_j)``, option
    ``alpha`` (3); :func:`~.expansion.alpha_qe`."""

    name = "alpha"
    options = {"alpha": 3.0}

    def expand(self, q, neighbours):
        return alpha_qe(q, neighbours, ranks=np.arange(len(neighbours)), top=len(neighbours),
                        alpha=float(self.opts["alpha"]))


@register_expansion
class DBA(Expansion):
    """DBA (Arandjelović & Zisserman 2012, Sec. 4; α-weighted as Radenović et al. 2018):
    ``x ← L2(Σ_{j∈kNN(x)} max(xᵀx_j, 0)^α x_j)`` over each database vector's ``n`` nearest neighbours, itself
    included; option ``alpha`` (3; 0 = plain mean). Applied on the database side, as an index-time transform:
    :mod:`instance_search.search` augments every stored vector once (k-NN of all vectors by the index's FAISS
    search), keeps the augmented vectors in memory until the index changes, and runs the first stage against them
    (the query itself is not expanded)."""

    name = "dba"
    options = {"alpha": 3.0}

    def database(self, vectors, neighbours, n):
        return dba(vectors, k=n, alpha=float(self.opts["alpha"]), neighbours=neighbours)
