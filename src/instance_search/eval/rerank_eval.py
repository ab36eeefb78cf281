"""A benchmark evaluated through the product's search pipeline (:mod:`instance_search.search`), so that
re-ranking and query expansion (``aml``, ``aml-fast``, ``casr``, ``cs-sr``; ``avg``, ``alpha``, ``dba``) get the
benchmark's standard figures (``isearch eval ... --rerank NAME --qe N``).

The database images are indexed with the recipe into an index folder (a temporary one unless ``index_dir`` is
given; an existing index of the same images is reused), every query is searched over the whole database
(``top`` = all images: the first ``shortlist`` re-ranked, then the rest in first-stage order) and the ranks go to
:meth:`~instance_search.eval.datasets.benchmarks.Benchmark.evaluate`. A query that is a database image without a
box is searched from its stored vector and map (:meth:`Collection.search_indexed`); a query with a box is
described from the crop, as the protocols say.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .. import search as S
from ..collection import Collection
from ..index.store import IndexStore
from ..io import progress_bar
from ..recipes.base import Recipe
from .runner import training_images

__all__ = ["evaluate_search"]


def evaluate_search(bench, recipe: Recipe, whitening: str | os.PathLike | None = None, *,
                    rerank: str | None = None, shortlist: int = 100, qe: int = 0, qe_kind: str = "avg",
                    detector: str | os.PathLike | None = None, rerank_options: Mapping[str, Any] | None = None,
                    qe_options: Mapping[str, Any] | None = None, index_dir: str | os.PathLike | None = None,
                    fit_on=None, progress: bool = True, device: str = "cpu", engine: str = "auto") -> dict[str, Any]:
    """The figures of ``bench`` when every query goes through ``Collection.search`` with ``rerank`` /
    ``shortlist`` / ``qe`` / ``qe_kind`` (module docstring). ``whitening``: ``None`` or the file of a whitening
    learned on ANOTHER collection; ``fit_on``: the training images of a recipe that learns (as
    :func:`~instance_search.eval.runner.evaluate_recipe`: a benchmark name, a folder or a list of paths)."""
    if index_dir is None:
        with tempfile.TemporaryDirectory(prefix="isearch-eval-") as tmp:
            return evaluate_search(bench, recipe, whitening, rerank=rerank, shortlist=shortlist, qe=qe,
                                   qe_kind=qe_kind, detector=detector, rerank_options=rerank_options,
                                   qe_options=qe_options, index_dir=Path(tmp) / "index", fit_on=fit_on,
                                   progress=progress, device=device, engine=engine)
    index_dir = Path(index_dir)
    t0 = time.perf_counter()
    if IndexStore.exists(index_dir):
        col = Collection.open(index_dir, writable=True, device=device, engine=engine)
        if col.recipe.to_dict() != recipe.to_dict():
            raise ValueError(f"{index_dir}: an index of another recipe ({col.recipe.name}); give another --index")
    else:
        col = Collection.create(index_dir, recipe, whitening="none" if whitening is None else whitening,
                                fit_on=None if fit_on is None else training_images(fit_on), progress=progress,
                                device=device, engine=engine)
    report = col.add_folder(bench.images, progress=progress)
    if report.failed:
        raise ValueError(f"{bench.name}: {len(report.failed)} database images could not be indexed, e.g. "
                         f"{report.failed[0][0]}: {report.failed[0][1]}")
    col = Collection.open(index_dir, device=device, engine=engine)
    t1 = time.perf_counter()
    row_of = {r["path"]: k for k, r in enumerate(col.records())}
    db_rows = np.asarray([row_of[str(Path(p).resolve())] for p in bench.images], np.int64)
    image_of_row = np.empty(len(db_rows), np.int64)
    image_of_row[db_rows] = np.arange(len(db_rows))
    id_of_image = [col.records()[r]["id"] for r in db_rows]
    pos_of_id = {r["id"]: k for k, r in enumerate(col.records())}
    n = len(bench.images)
    opts = dict(rerank=rerank, shortlist=shortlist, qe=qe, qe_kind=qe_kind, detector=detector,
                rerank_options=rerank_options, qe_options=qe_options)
    ranks = np.empty((n, bench.n_queries), np.int64)
    bar = progress_bar(bench.n_queries, f"{bench.name} queries", progress)
    try:
        for q, (path, box, qi) in enumerate(zip(bench.query_paths, bench.query_boxes, bench.query_indices)):
            if box is None and qi is not None:
                hits = col.search_indexed(id_of_image[int(qi)], top=n, **opts)
            else:
                hits = S.search(col, path, box, n, first_stage="box", **opts)  # the protocols' crop
            if len(hits) != n:
                raise ValueError(f"{bench.name}: query {q} got {len(hits)} hits for {n} images")
            ranks[:, q] = image_of_row[[pos_of_id[h.id] for h in hits]]
            bar.update(1)
    finally:
        bar.close()
    t2 = time.perf_counter()
    res = dict(bench.evaluate(ranks))
    res.update({"benchmark": bench.name, "recipe": recipe.to_dict(),
                "whitening": None if whitening is None else str(whitening),
                "rerank": rerank or "none", "shortlist": shortlist, "qe": qe, "qe_kind": qe_kind,
                "database_images": n, "queries": bench.n_queries,
                "index_seconds": round(t1 - t0, 2), "search_seconds": round(t2 - t1, 2)})
    return res
