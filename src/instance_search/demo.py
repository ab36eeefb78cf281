"""`isearch demo`: the main job on a small real example: UKBench views from ../shared/data when it is there;
otherwise (a fresh machine, offline) photos that ship inside the scikit-image wheel, each made into a group of
4 views by crops, flips and rescales."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import typer

from .eval.datasets.benchmarks import find_shared_data


#: Colour photos in scikit-image's wheel (skimage/data/*, installed with the package, never downloaded on demand).
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "color.png", "logo.png")


def _views(img, k: int, rng: np.random.Generator):
    """View ``k`` of a photo: 0 the photo, 1 a mirrored crop, 2 a shifted 75 % crop, 3 a rescaled 85 % crop; for
    ``k >= 4`` (training) a random crop of 55-95 %, maybe mirrored, at 50-100 % scale."""
    from PIL import Image

    w, h = img.size
    if k == 0:
        return img
    if k == 1:
        return img.crop((w // 10, h // 10, w - w // 20, h - h // 20)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if k == 2:
        return img.crop((w // 4, h // 8, w, h * 7 // 8))
    if k == 3:
        c = img.crop((0, h // 10, w * 17 // 20, h * 19 // 20))
        return c.resize((max(64, c.width * 3 // 5), max(64, c.height * 3 // 5)), Image.Resampling.LANCZOS)
    f = rng.uniform(0.55, 0.95)
    cw, ch = int(w * f), int(h * f)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    c = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        c = c.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    s = rng.uniform(0.5, 1.0)
    return c.resize((max(64, int(c.width * s)), max(64, int(c.height * s))), Image.Resampling.LANCZOS)


def offline_photos(folder: Path, n_images: int, n_train: int = 0) -> tuple[list[Path], list[Path]]:
    """Demo photos without ../shared/data: the colour photos that ship in the scikit-image wheel
    (:data:`SKIMAGE_PHOTOS`), 4 views of each (``demoNNNNN.jpg``, group = NNNNN // 4 as UKBench), written to
    ``folder``; plus ``n_train`` other random views of the same photos (``train/``) for recipes that learn.
    Raises FileNotFoundError with what to do when scikit-image (or its photos) is missing."""
    from PIL import Image

    try:
        import skimage
    except ImportError:
        raise FileNotFoundError("the demo needs photos: ../shared/data/ukbench1000 is not here (set ISEARCH_DATA to "
                                "the folder holding ukbench1000/), and the offline fallback needs scikit-image, "
                                "whose wheel ships sample photos: pip install scikit-image") from None
    src = Path(skimage.__file__).resolve().parent / "data"
    missing = [n for n in SKIMAGE_PHOTOS if not (src / n).is_file()]
    if missing:
        raise FileNotFoundError(f"scikit-image {skimage.__version__} at {src} lacks the sample photos {missing}; "
                                "reinstall it (pip install --force-reinstall scikit-image) or set ISEARCH_DATA")
    n_objects = min(len(SKIMAGE_PHOTOS), max(1, n_images // 4))
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths, train = [], []
    for o, name in enumerate(SKIMAGE_PHOTOS[:n_objects]):
        with Image.open(src / name) as im:
            img = im.convert("RGB")
        for k in range(4):
            p = folder / f"demo{4 * o + k:05d}.jpg"
            _views(img, k, rng).save(p, quality=90)
            paths.append(p)
    if n_train:
        (folder / "train").mkdir(exist_ok=True)
        for t in range(n_train):
            name = SKIMAGE_PHOTOS[t % n_objects]
            with Image.open(src / name) as im:
                img = im.convert("RGB")
            p = folder / "train" / f"train{t:05d}.jpg"
            _views(img, 4 + t, rng).save(p, quality=90)
            train.append(p)
    return paths, train


def run_demo(out: Path, n_images: int = 40, backbone: str | None = None, recipe=None, fit_on=None,
             n_train: int = 200, engine: str = "auto") -> dict:
    """Index the first ``n_images`` UKBench images with ``recipe`` (default: R-MAC on ``backbone`` at max side
    512), query with each, print the N-S score. A recipe that learns (Ng's VLAD, Hoang's selective features) is
    fitted on ``fit_on``, by default the next ``n_train`` UKBench images (other objects than the indexed ones)."""
    from .collection import Collection
    from .eval.metrics import ukbench_ns_score
    from .recipes.base import Recipe

    data = find_shared_data()
    n_images = max(4, (n_images // 4) * 4)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    recipe = recipe or Recipe("rmac", backbone=backbone, max_size=512)
    learns = recipe.needs_fit and not recipe.fitted and fit_on is None
    if data is not None and (data / "ukbench1000").is_dir():
        what = "UKBench photos"
        paths = sorted((data / "ukbench1000").glob("ukbench*.jpg"))[:n_images]
        if learns:
            fit_on = sorted((data / "ukbench1000").glob("ukbench*.jpg"))[n_images:n_images + n_train]
            typer.echo(f"demo: recipe {recipe.name} learns from a training collection: fitting it on the next "
                       f"{len(fit_on)} UKBench photos (other objects than the indexed ones)")
    else:
        where = "ISEARCH_DATA" if data is not None else "../shared/data"
        photos_dir = out.parent / f"{out.name}-photos"
        if photos_dir.exists():
            shutil.rmtree(photos_dir)
        paths, train = offline_photos(photos_dir, n_images, n_train if learns else 0)
        what = "views of scikit-image's sample photos"
        typer.echo(f"demo: no UKBench photos in {where} ({data if data is not None else 'not found'}); using "
                   f"the sample photos that ship in the scikit-image wheel instead: {len(paths) // 4} photos, "
                   f"4 views each (crops, a mirror, a rescale), written to {photos_dir}"
                   + (f" (at most {4 * len(SKIMAGE_PHOTOS)} images offline)" if len(paths) < n_images else ""))
        if learns:
            fit_on = train
            typer.echo(f"demo: recipe {recipe.name} learns from a training collection: fitting it on {len(train)} "
                       "other random views of the same photos (offline there are no held-out objects)")
    typer.echo(f"demo: indexing {len(paths)} {what} ({len(paths) // 4} objects x 4 views) into {out} "
               f"with recipe {recipe.name} on {recipe.backbone} conv features (max side {recipe.max_size})")
    col = Collection.create(out, recipe, whitening="self", fit_on=fit_on, progress=True, engine=engine)
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
    label = "UKBench N-S score" if what.startswith("UKBench") else "N-S score (4 views per photo)"
    typer.echo(f"{label} on these {len(paths)} images: {ns:.2f} / 4.00 ({how})")
    from .viz import draw_ranked

    picture = draw_ranked(paths[0], [h.path for h in hits], [h.score for h in hits], out / "demo-ranked.png",
                          relevant=[int(Path(h.path).stem[-5:]) // 4 == 0 for h in hits])
    typer.echo(f"picture of the ranked list: {picture}")
    typer.echo(f"next: isearch search {paths[min(5, len(paths) - 1)]} --index {out} --top 4 --rerank aml --show ranked.png")
    return {"ns_score": float(ns), "images": len(paths), "recipe": recipe.name}
