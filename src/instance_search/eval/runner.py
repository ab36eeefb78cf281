"""Run a recipe over a standard benchmark: describe database and (box-cropped) queries, score, evaluate.

Used by ``isearch eval`` and the scripts in ``benchmarks/``. Local (pre-whitening) vectors can be cached
in an ``.npz`` file so that several whitening choices are compared without running the network again.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..collection import Describer, fit_recipe
from ..images import Box, list_images, load_image
from ..io import atomic_save_npz, load_npz, prefetch, progress_bar
from ..fitted.whitening import PCAWhitening
from ..recipes.base import Recipe


def _cache_key(recipes: Sequence[Recipe], items: Sequence[tuple[Path, Any]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([r.to_dict() for r in recipes], sort_keys=True).encode())
    for r in recipes:  # a fitted recipe's vectors depend on what it learned
        for k, v in sorted(r.state_dict().items()):
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).tobytes())
    for path, box in items:
        b = None if box is None else box.as_tuple() if isinstance(box, Box) else tuple(box)
        h.update(f"{Path(path).name}|{b}".encode())
    return h.hexdigest()[:20]


def extract_locals(items: Sequence[tuple[Path, Box | tuple | None]], recipes: Sequence[Recipe], *,
                   describer: Describer | None = None, progress: bool = True, cache_dir: Path | None = None,
                   desc: str = "describing") -> dict[str, list[np.ndarray]]:
    """Local (R, C) vectors of every (image, box) for each recipe, from ONE forward pass per image.

    All recipes must share backbone, max_size and what they read (:meth:`Recipe.needs`); fitted recipes must
    be fitted. Returns ``{recipe.name: [array per image]}``.
    """
    recipes = list(recipes)
    first = recipes[0]
    for r in recipes[1:]:
        if (r.backbone, r.layer, r.max_size) != (first.backbone, first.layer, first.max_size) or \
                r.needs("?") != first.needs("?"):
            raise ValueError("extract_locals: recipes must share backbone, layers, scales and max_size")
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"locals-{_cache_key(recipes, items)}.npz"
        if cache.exists():
            z = load_npz(cache)
            out = {}
            for r in recipes:
                off = z[f"{r.name}_off"]
                out[r.name] = [z[r.name][off[i]:off[i + 1]].astype(np.float32) for i in range(len(off) - 1)]
            return out
    describer = describer or Describer(first)
    out: dict[str, list[np.ndarray]] = {r.name: [] for r in recipes}
    bar = progress_bar(len(items), desc, progress)
    try:
        for img in prefetch(lambda it: load_image(it[0], max_size=first.max_size, box=it[1]), items):
            feats = describer.features(img)
            for r in recipes:
                out[r.name].append(r.local(feats))
            bar.update(1)
    finally:
        bar.close()
    if cache is not None:
        arrays = {}
        for r in recipes:
            arrays[r.name] = np.concatenate(out[r.name]).astype(np.float16)
            arrays[f"{r.name}_off"] = np.concatenate([[0], np.cumsum([len(x) for x in out[r.name]])])
        atomic_save_npz(cache, **arrays)
    return out


def benchmark_items(bench) -> tuple[list[tuple[Path, None]], list[tuple[Path, Any]], list[int | None]]:
    """(database items, query items, for each query the database position it can reuse or None)."""
    db = [(Path(p), None) for p in bench.images]
    pos = {str(p): i for i, (p, _) in enumerate(db)}
    queries, reuse = [], []
    for qpath, qbox in zip(bench.query_paths, bench.query_boxes):
        queries.append((Path(qpath), qbox))
        reuse.append(pos.get(str(Path(qpath))) if qbox is None else None)
    return db, queries, reuse


def describe_benchmark(bench, recipes: Sequence[Recipe], *, progress: bool = True, cache_dir: Path | None = None,
                       describer: Describer | None = None) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """``{recipe: (database locals, query locals)}``; queries without a box reuse their database entry."""
    db, queries, reuse = benchmark_items(bench)
    describer = describer or Describer(recipes[0])
    dbl = extract_locals(db, recipes, describer=describer, progress=progress, cache_dir=cache_dir,
                         desc=f"{bench.name} database")
    todo = [q for q, r in zip(queries, reuse) if r is None]
    ql = extract_locals(todo, recipes, describer=describer, progress=progress, cache_dir=cache_dir,
                        desc=f"{bench.name} queries") if todo else {r.name: [] for r in recipes}
    out = {}
    for r in recipes:
        it = iter(ql[r.name])
        q = [dbl[r.name][k] if k is not None else next(it) for k in reuse]
        out[r.name] = (dbl[r.name], q)
    return out


def score(recipe: Recipe, db_local: list[np.ndarray], q_local: list[np.ndarray],
          whitening: PCAWhitening | None) -> np.ndarray:
    """Similarity matrix (n_queries, n_database) of the global vectors."""
    d = recipe.finalize(db_local, whitening)
    q = recipe.finalize(q_local, whitening)
    return q @ d.T


def training_images(fit_on) -> list[Path]:
    """The images a recipe is fitted on: a benchmark's database images (a benchmark object or its name, e.g.
    ``"ukbench"`` -- the papers fit on another benchmark than they test on), a folder, or a list of paths."""
    if isinstance(fit_on, (list, tuple)):
        return [Path(p) for p in fit_on]
    if hasattr(fit_on, "images"):
        return [Path(p) for p in fit_on.images]
    if isinstance(fit_on, str) and not Path(fit_on).exists():
        from .datasets import load_benchmark

        return [Path(p) for p in load_benchmark(fit_on).images]
    return list_images(fit_on)


def evaluate_recipe(bench, recipe: Recipe, whitening: PCAWhitening | str | os.PathLike | None = None, *,
                    progress: bool = True, cache_dir: Path | None = None, fit_on=None,
                    describer: Describer | None = None) -> dict[str, Any]:
    """Describe ``bench`` with ``recipe``, optionally whiten (a whitening learned on ANOTHER collection),
    and return the benchmark's standard figures plus timing and provenance. A recipe that learns (Ng's VLAD,
    Hoang's selective features) is first fitted on ``fit_on`` (see :func:`training_images`)."""
    if whitening is not None and not isinstance(whitening, PCAWhitening):
        whitening = PCAWhitening.load(Path(whitening))
    describer = describer or Describer(recipe)
    t0 = time.perf_counter()
    trained_on = None
    if fit_on is not None:
        train = training_images(fit_on)
        fit_recipe(recipe, train, describer=describer, progress=progress)
        trained_on = getattr(fit_on, "name", None) or (str(fit_on) if not isinstance(fit_on, (list, tuple))
                                                       else f"{len(train)} images")
    t_fit = time.perf_counter()
    (db_local, q_local), = describe_benchmark(bench, [recipe], progress=progress, cache_dir=cache_dir,
                                              describer=describer).values()
    t1 = time.perf_counter()
    scores = score(recipe, db_local, q_local, whitening)
    res = dict(bench.evaluate(scores))
    res.update({
        "benchmark": bench.name,
        "recipe": recipe.to_dict(),
        "whitening": None if whitening is None else getattr(whitening, "trained_on", "given"),
        "fitted_on": trained_on,
        "database_images": len(db_local),
        "queries": len(q_local),
        "fit_seconds": round(t_fit - t0, 2),
        "describe_seconds": round(t1 - t_fit, 2),
    })
    return res


def extract_maps(items: Sequence[tuple[Path, Box | tuple | None]], recipe: Recipe, *,
                 describer: Describer | None = None, progress: bool = True, cache_dir: Path | None = None,
                 desc: str = "feature maps") -> list[np.ndarray]:
    """Float conv feature maps ``(C, H, W)`` (float16) of every (image, box), at the recipe's backbone, layer and
    max_size; cached in ``cache_dir`` as one ``maps-<key>.npz`` (flat values + shapes) when given.

    Used by the localisation / re-ranking benchmarks, which need the uncompressed maps as the reference.
    """
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"maps-{_cache_key([recipe], items)}.npz"
        if cache.exists():
            z = load_npz(cache)
            off, shapes = z["off"], z["shapes"]
            return [z["values"][off[i]:off[i + 1]].reshape(tuple(shapes[i])) for i in range(len(shapes))]
    describer = describer or Describer(recipe)
    out: list[np.ndarray] = []
    bar = progress_bar(len(items), desc, progress)
    try:
        for img in prefetch(lambda it: load_image(it[0], max_size=recipe.max_size, box=it[1]), items):
            out.append(describer.feature_map(img).detach().cpu().numpy().astype(np.float16))
            bar.update(1)
    finally:
        bar.close()
    if cache is not None:
        atomic_save_npz(cache, values=np.concatenate([m.ravel() for m in out]),
                        off=np.concatenate([[0], np.cumsum([m.size for m in out])]),
                        shapes=np.asarray([m.shape for m in out], np.int64))
    return out
