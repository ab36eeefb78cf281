"""`isearch demo`: the main job on a small real example (UKBench views from ../shared/data)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import typer

from .eval.datasets.benchmarks import find_shared_data


def run_demo(out: Path, n_images: int = 40, backbone: str = "vgg16", recipe=None, fit_on=None,
             n_train: int = 200) -> dict:
    """Index the first ``n_images`` UKBench images with ``recipe`` (default: R-MAC on ``backbone`` at max side
    512), query with each, print the N-S score. A recipe that learns (Ng's VLAD, Hoang's selective features) is
    fitted on ``fit_on``, by default the next ``n_train`` UKBench images (other objects than the indexed ones)."""
    from .collection import Collection
    from .eval.metrics import ukbench_ns_score
    from .recipes.base import Recipe

    data = find_shared_data()
    if data is None or not (data / "ukbench1000").is_dir():
        raise FileNotFoundError("the demo needs ../shared/data/ukbench1000 (or set ISEARCH_DATA to the data folder)")
    n_images = max(4, (n_images // 4) * 4)
    paths = sorted((data / "ukbench1000").glob("ukbench*.jpg"))[:n_images]
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    recipe = recipe or Recipe("rmac", backbone=backbone, max_size=512)
    if recipe.needs_fit and not recipe.fitted and fit_on is None:
        fit_on = sorted((data / "ukbench1000").glob("ukbench*.jpg"))[n_images:n_images + n_train]
        typer.echo(f"demo: recipe {recipe.name} learns from a training collection: fitting it on the next "
                   f"{len(fit_on)} UKBench photos (other objects than the indexed ones)")
    typer.echo(f"demo: indexing {len(paths)} UKBench photos ({len(paths) // 4} objects x 4 views) into {out} "
               f"with recipe {recipe.name} on {recipe.backbone} conv features (max side {recipe.max_size})")
    col = Collection.create(out, recipe, whitening="self", fit_on=fit_on, progress=True)
    t0 = time.perf_counter()
    report = col.add_folder(paths, progress=True)
    typer.echo(f"indexed: {report.summary()} in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    hits = col.search(paths[0], top=4)
    typer.echo(f"query {paths[0].name} -> top 4 ({(time.perf_counter() - t0) * 1000:.0f} ms):")
    for h in hits:
        typer.echo(f"  {h.rank}. {Path(h.path).name}  score {h.score:.3f}")
    # Every image a query, against the index's own vectors (the standard UKBench protocol).
    vecs = col.vectors()
    order = {Path(r["path"]).name: i for i, r in enumerate(col.records())}
    idx = [order[p.name] for p in paths]
    v = vecs[idx]
    scores = v @ v.T
    groups = np.arange(len(paths)) // 4
    ns = ukbench_ns_score(scores, groups)
    how = "whitening learned on the collection itself" if col.whitening is not None else "no whitening"
    typer.echo(f"UKBench N-S score on these {len(paths)} images: {ns:.2f} / 4.00 ({how})")
    from .viz import draw_ranked

    picture = draw_ranked(paths[0], [h.path for h in hits], [h.score for h in hits], out / "demo-ranked.png",
                          relevant=[int(Path(h.path).stem[-5:]) // 4 == 0 for h in hits])
    typer.echo(f"picture of the ranked list: {picture}")
    typer.echo(f"next: isearch search {paths[min(5, len(paths) - 1)]} --index {out} --top 4 --rerank aml --show ranked.png")
    return {"ns_score": float(ns), "images": len(paths), "recipe": recipe.name}
