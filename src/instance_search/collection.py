"""The thin layer that composes images → backbone → recipe → index → search.

>>> col = Collection.create("my-index", Recipe("rmac", backbone="vgg16"))
>>> report = col.add_folder("photos/")
>>> hits = col.search("query.jpg", box=(10, 20, 200, 300), top=10)
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from .io import file_sha256, load_npz, prefetch, progress_bar
from .images import Box, ImageError, list_images, load_image, parse_box, regular_file_sha256
from .index.faiss_backend import build_faiss
from .index.faiss_backend import search as faiss_search
from .index.store import CorruptIndexError, Entry, IndexStore
from .ops.normalize import l2n
from .fitted.whitening import NotFittedError, PCAWhitening
from .recipes.base import Features, Needs, Recipe, RecipeError
from .search import Hit, SearchState


@dataclass
class IndexReport:
    added: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    whitening: str = ""

    def summary(self) -> str:
        s = (f"{len(self.added)} added, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
             f"{len(self.failed)} failed")
        return s + (f"; {self.whitening}" if self.whitening else "")


class Describer:
    """Backbone + recipe: image -> :class:`Features` -> (local vectors, the map kept for re-ranking). Loads the
    network lazily, once, and lets the recipe prepare it (e.g. learned R-MAC's trained conv layers)."""

    def __init__(self, recipe: Recipe, weights: str | None = None, device: str = "cpu", engine: str = "auto"):
        self.recipe = recipe
        self.weights = weights
        self.device = device
        self._backbone = None
        self.engine = engine

    @property
    def engine(self) -> str:
        """The engine asked for: ``auto`` (winograd for VGG16 / ResNet-50 on the CPU, folded for EfficientNet-Lite0
        on the CPU, else exact: see :func:`~instance_search.backbones.fast.resolve_engine`), ``exact`` fp32,
        ``winograd`` or ``folded``.
        Setting it checks the name against the backbone and device (:class:`EngineError` before any image is
        read) and switches a network already loaded."""
        return self._engine

    @engine.setter
    def engine(self, engine: str) -> None:
        self._engine = engine
        self.engine_name  # noqa: B018 - raises EngineError naming a bad engine
        if self._backbone is not None:
            from .backbones.fast import use_engine

            use_engine(self._backbone, engine)

    @property
    def engine_name(self) -> str:
        """The engine that runs (``auto`` resolved for this recipe's backbone and this device)."""
        from .backbones.fast import resolve_engine
        from .backbones.weights import WeightsError, canon_arch

        try:
            arch = canon_arch(self.recipe.backbone)
        except (WeightsError, ValueError, KeyError):  # an unknown backbone fails when loaded, naming it
            arch = str(self.recipe.backbone)
        return resolve_engine(arch, self.device, self._engine)

    @property
    def backbone(self):
        if self._backbone is None:
            from .backbones import load_backbone
            from .backbones.fast import use_engine

            self._backbone = load_backbone(self.recipe.backbone, weights=self.weights, device=self.device)
            self.recipe.method.prepare_backbone(self._backbone)  # before any engine takes the weights
            use_engine(self._backbone, self.engine)
        return self._backbone

    @property
    def layer(self) -> str:
        return self.recipe.layer or self.backbone.default_layer

    @property
    def needs(self) -> Needs:
        return self.recipe.needs(self.backbone.default_layer)

    def feature_map(self, img: Image.Image):
        """Conv feature map (C, H, W) of ``img`` at the recipe's layer (scale 1)."""
        feats = self.backbone.features(img, layers=[self.layer], scales=(1.0,))
        return feats[(self.layer, 1.0)]

    def features(self, img: Image.Image) -> Features:
        """Everything the recipe reads of ``img`` (its layers at its scales, SIFT keypoints if asked): one pass."""
        needs = self.needs
        maps = self.backbone.features(img, layers=list(needs.layers), scales=needs.scales)
        keypoints = None
        if needs.keypoints:
            from .ops.masks import sift_keypoints

            keypoints = sift_keypoints(img)
        return Features(maps=maps, image_hw=(img.height, img.width), keypoints=keypoints)

    def describe(self, img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """(local vectors (R, D), the (C, H, W) map kept for re-ranking) of one image."""
        feats = self.features(img)
        fmap = self.recipe.method.map_for_rerank(feats, self.backbone.default_layer)
        return self.recipe.local(feats), fmap.detach().cpu().numpy()


def _decode(path: Path, max_size: int) -> tuple[Path, Any, os.stat_result | None, str]:
    """Read one file for indexing: (path, image or error, stat, sha256). Runs in a worker thread."""
    try:
        st, sha = regular_file_sha256(path)  # FIFOs, devices, loops: ImageError; reads at most st.st_size bytes
        img = load_image(path, max_size=max_size)
        return path, img, st, sha
    except ImageError as exc:
        return path, exc, None, ""
    except OSError as exc:
        return path, ImageError(f"{path}: {exc.strerror or exc}"), None, ""


def fit_whitening(rows: np.ndarray, dim: int | None = None, trained_on: str = "", power: float = 0.5) -> PCAWhitening:
    """PCA-whitening (Jégou & Chum 2012) of local vectors; Ledoit-Wolf shrinkage of the covariance when
    there are fewer than two samples per dimension (e.g. MAC on a few hundred images). ``power`` < 0.5 whitens
    partially (eigenvalues to the power -``power``; 0 = PCA rotation only)."""
    rows = np.asarray(rows, np.float32)
    shrink = "auto" if len(rows) < 2 * rows.shape[1] else 0.0
    return PCAWhitening().fit(rows, dim=dim, shrinkage=shrink, trained_on=trained_on, power=power)


#: prefix of a recipe option that names a file stored inside the index folder (``IndexStore.add_file``)
INDEX_FILE = "index:"


def _stored_recipe(store: IndexStore) -> Recipe:
    """The index's recipe with its model files resolved to the verified copies inside the index folder and its
    fitted state loaded from the index; anything missing or damaged raises CorruptIndexError naming it."""
    try:
        d = dict(store.settings["recipe"])
    except (KeyError, TypeError) as exc:
        raise CorruptIndexError(f"{store.root}: the index settings have no recipe") from exc
    extra = dict(d.get("extra") or {})
    for key, value in extra.items():
        if isinstance(value, str) and value.startswith(INDEX_FILE):
            name = value[len(INDEX_FILE):]
            store.read_file(name)  # verifies the sha256 (CorruptIndexError names the file)
            store.read_file(str(Path(name).with_suffix(".json")))
            extra[key] = str(store.root / "fitted" / name)
    d["extra"] = extra
    try:
        recipe = Recipe.from_dict(d)
    except RecipeError as exc:
        raise CorruptIndexError(f"{store.root}: the index's recipe is not valid here ({exc})") from exc
    name = store.settings.get("recipe_state")
    if name:
        state = load_npz(store.read_file(name), CorruptIndexError, "fitted state", name=store.root / "fitted" / name)
        try:
            recipe.load_state_dict(state)
        except (RecipeError, ValueError, KeyError) as exc:
            raise CorruptIndexError(f"{store.root / 'fitted' / name}: not the fitted state of recipe "
                                    f"{recipe.name!r} ({exc})") from exc
    elif recipe.needs_fit:
        raise CorruptIndexError(f"{store.root}: recipe {recipe.name!r} needs its fitted state, which the index "
                                "does not hold")
    return recipe


class TrainingFeatures(Sequence):
    """The :class:`Features` of a training collection, computed when asked (one backbone pass per image and
    per walk): a recipe that walks its training set twice (codebook, then projection) gets a re-iterable
    sequence without holding every conv map in memory. Iteration decodes ahead in threads."""

    def __init__(self, paths: Sequence[Path], describer: "Describer", max_size: int, bar=None):
        self.paths = list(paths)
        self.describer = describer
        self.max_size = max_size
        self.bar = bar

    def __len__(self) -> int:
        return len(self.paths)

    def _features(self, img) -> Features:
        if self.bar is not None:
            self.bar.update(1)
        return self.describer.features(img)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return TrainingFeatures(self.paths[i], self.describer, self.max_size, self.bar)
        return self._features(load_image(self.paths[i], max_size=self.max_size))

    def __iter__(self) -> Iterator[Features]:
        for _path, img, _st, _sha in prefetch(lambda p: _decode(p, self.max_size), self.paths):
            if isinstance(img, Exception):
                raise img
            yield self._features(img)


def fit_recipe(recipe: Recipe, photos: str | os.PathLike | Sequence[str | os.PathLike], *,
               weights: str | None = None, device: str = "cpu", engine: str = "auto", progress: bool = True,
               describer: "Describer | None" = None) -> Recipe:
    """Fit ``recipe`` on a training collection (a folder or a list of images) through
    :class:`TrainingFeatures`. Unreadable training images are left out first, and counted."""
    paths = list_images(photos) if isinstance(photos, (str, os.PathLike)) else [Path(p) for p in photos]
    good, skipped = [], []
    for path, img, _st, _sha in prefetch(lambda p: _decode(p, recipe.max_size), paths):
        (skipped if isinstance(img, Exception) else good).append(str(img) if isinstance(img, Exception) else path)
    if skipped:
        print(f"fitting {recipe.name}: left out {len(skipped)} unreadable training image(s), e.g. {skipped[0]}",
              file=sys.stderr)
    if not good:
        raise ImageError(f"{photos}: no readable training images to fit recipe {recipe.name!r} on")
    describer = describer or Describer(recipe, weights=weights, device=device, engine=engine)
    bar = progress_bar(None, f"fitting {recipe.name} (images described)", progress)
    where = str(photos) if isinstance(photos, (str, os.PathLike)) else f"{len(good)} images"
    try:
        recipe.fit(TrainingFeatures(good, describer, recipe.max_size, bar), trained_on=where)
    finally:
        bar.close()
    return recipe


class Collection:
    """An indexed photo collection on disk (an :class:`IndexStore`) with its recipe and whitening."""

    WHITENING_MODES = ("self", "none")
    #: Below this many images a self-learned whitening over-fits the collection, so the index stays unwhitened
    #: until it grows. Measured: 12 UKBench images whitened on themselves rank worse than unwhitened; the 238
    #: Paris database images (5 landmarks) whitened on their own 9.5k R-MAC regions drop R-MAC from 81.1/80.3/53.3
    #: to 50.9/48.8/11.1 mAP E/M/H (the high-variance directions it flattens are the ones that tell the landmarks
    #: apart), while Holidays-811 (500 scenes) gains (74.3 -> 79.8). A whitening learned on another, diverse
    #: collection (`isearch whitening learn`, `--whitening FILE`) is the papers' protocol and the safe choice.
    MIN_SELF_WHITENING_IMAGES = 500

    def __init__(self, store: IndexStore, weights: str | None = None, device: str = "cpu",
                 faiss_kind: str = "flat", engine: str = "auto"):
        self.store = store
        self.faiss_kind = faiss_kind  # "flat" (exact, default), "hnsw" or "ivfpq" (approximate, large collections)
        self.recipe = _stored_recipe(store)
        self.describer = Describer(self.recipe, weights=weights or store.settings.get("weights"), device=device,
                                   engine=engine)
        self.whitening: PCAWhitening | None = None
        info = store.whitening_info
        if info is not None:
            wpath = store.root / info["file"]
            try:
                self.whitening = PCAWhitening.load(wpath)
            except Exception as exc:
                raise CorruptIndexError(f"{wpath}: the index's whitening cannot be loaded ({exc})") from exc
        self._faiss = None
        self._faiss_ids: np.ndarray | None = None
        self._records: list[dict[str, Any]] | None = None
        #: default options of each re-ranking, by name (rerank/base.py), e.g. ``{"aml-fast": {"K": 64}}``
        self.rerank_options: dict[str, dict[str, Any]] = {}
        self._search_state = SearchState()  # re-rankers (with their caches) and DBA vectors, see search.py

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(cls, root: str | os.PathLike, recipe: Recipe, *, whitening: str | os.PathLike = "self",
               weights: str | None = None, store_maps: bool = True, device: str = "cpu",
               fit_on: str | os.PathLike | Sequence[str | os.PathLike] | None = None, engine: str = "auto",
               progress: bool = False) -> "Collection":
        """Create an empty index at ``root``. ``whitening``: ``"self"`` (learn it on this collection after
        indexing), ``"none"``, or the path of a whitening fitted elsewhere (``isearch whitening learn``).

        A recipe that learns something (``recipe.needs_fit``: Ng's codebooks, Hoang's PCA / codebook / rotation)
        is fitted first on ``fit_on`` (a folder or a list of training images, never the collection itself) unless
        it is fitted already; its fitted state and the model files its options name are copied INTO the index
        folder with their sha256, so the folder searches wherever it is moved."""
        # the engine that describes the images, recorded in the settings (checked before anything is written)
        engine_name = Describer(recipe, device=device, engine=engine).engine_name
        if not recipe.whitened and str(whitening) == "self":
            whitening = "none"  # the recipe's own projection already whitens (learned R-MAC's head, VLAD's PCA-w)
        if str(whitening) not in cls.WHITENING_MODES and not Path(whitening).is_file():
            raise FileNotFoundError(f"{whitening}: whitening file not found")
        given = PCAWhitening.load(Path(whitening)) if str(whitening) not in cls.WHITENING_MODES else None
        if recipe.needs_fit and not recipe.fitted:
            if fit_on is None:
                raise NotFittedError(f"recipe {recipe.name!r} learns from a training collection: give one with "
                                     "--fit-on TRAIN_DIR (Collection.create(..., fit_on=...)), not the indexed photos")
            fit_recipe(recipe, fit_on, weights=weights, device=device, engine=engine, progress=progress)
        elif fit_on is not None and not recipe.needs_fit:
            raise RecipeError(f"recipe {recipe.name!r} learns nothing from a training collection: drop --fit-on")
        describer = None
        if given is not None:  # a whitening for other vectors (another backbone / layer / recipe) is refused now
            describer = Describer(recipe, weights=weights, device=device, engine=engine)
            probe = describer.describe(Image.new("RGB", (256, 256), (128, 128, 128)))[0]
            if given.in_dim != probe.shape[1]:
                raise ValueError(f"{whitening}: this whitening takes {given.in_dim}-D vectors, but recipe "
                                 f"{recipe.name!r} on {recipe.backbone} gives {probe.shape[1]}-D local vectors "
                                 "(learned for another backbone, layer or recipe?)")
        settings = {"recipe": recipe.to_dict(), "whitening_mode": "self", "store_maps": bool(store_maps),
                    "weights": weights, "engine": engine_name}
        settings["whitening_mode"] = "given" if given is not None else str(whitening)
        models = {key: recipe.extra[key] for key in recipe.method.model_files if recipe.extra.get(key)}
        for key, path in models.items():  # read before anything is written: a missing file creates no index
            if not Path(path).with_suffix(".pt").is_file() or not Path(path).with_suffix(".json").is_file():
                raise FileNotFoundError(f"{path}: model file for recipe option {key!r} not found "
                                        "(a model is a .pt file with its .json beside it)")
        store = IndexStore.create(root, settings)
        changes: dict[str, Any] = {}
        stored = dict(settings["recipe"], extra=dict(settings["recipe"]["extra"]))
        for key, path in models.items():
            pt, js = Path(path).with_suffix(".pt"), Path(path).with_suffix(".json")
            tag = file_sha256(pt)[:16]
            store.add_file(f"{key}-{tag}.pt", pt.read_bytes())
            store.add_file(f"{key}-{tag}.json", js.read_bytes())
            stored["extra"][key] = f"{INDEX_FILE}{key}-{tag}.pt"
        state = recipe.state_dict()
        if state:
            buf = io.BytesIO()
            np.savez(buf, **{k: np.asarray(v) for k, v in state.items()})
            data = buf.getvalue()
            name = f"recipe-state-{hashlib.sha256(data).hexdigest()[:16]}.npz"
            store.add_file(name, data)
            changes["recipe_state"] = name
        if models or state:
            changes["recipe"] = stored
            store.update_settings(changes)
        col = cls(store, weights=weights, device=device, engine=engine)
        if describer is not None and not models and not state:  # reuse the loaded network
            col.describer = describer
        if given is not None:
            col.set_whitening(given)
        return col

    @classmethod
    def open(cls, root: str | os.PathLike, *, writable: bool = False, weights: str | None = None,
             device: str = "cpu", faiss_kind: str = "flat", engine: str = "auto") -> "Collection":
        store = IndexStore.open(root, writable=writable)
        col = cls(store, weights=weights, device=device, faiss_kind=faiss_kind, engine=engine)
        if writable:
            col._refresh_vectors()
        return col

    # ------------------------------------------------------------------ whitening
    @property
    def whitening_tag(self) -> str:
        info = self.store.whitening_info
        return info["tag"] if info else "none"

    def set_whitening(self, whitening: PCAWhitening | None) -> None:
        """Install ``whitening`` (or none) and recompute every stored global vector with it."""
        if whitening is None:
            info = None
        else:
            staged = whitening.save(self.store.root / ".whitening-staged.npz")  # atomic, fsynced
            tag = file_sha256(staged)[:16]
            fname = f"whitening-{tag}.npz"
            os.replace(staged, self.store.root / fname)
            info = {"file": fname, "tag": tag, "trained_on": getattr(whitening, "trained_on", ""),
                    "dim": int(whitening.dim)}
        self.whitening = whitening
        tag = info["tag"] if info else "none"
        self.store.refresh_vectors(lambda local: self.recipe.finalize(local, self.whitening), tag)
        self.store.set_whitening(info)
        self._faiss = None

    def learn_whitening(self, dim: int | None = None, trained_on: str | None = None,
                        power: float = 0.5) -> PCAWhitening:
        """Fit PCA-whitening on this collection's own local vectors (R-MAC regions or one per image);
        ``power`` < 0.5: partial whitening (see :func:`fit_whitening`)."""
        if not self.recipe.whitened:
            raise RecipeError(f"{self.store.root}: recipe {self.recipe.name!r} projects its vectors itself; a "
                              "PCA-whitening learned on this index would not be used")
        local = self.store.local_descriptors()
        if not local:
            raise ValueError(f"{self.store.root}: cannot learn a whitening from an empty index")
        return fit_whitening(np.concatenate(local), dim=dim or self.recipe.whitening_dim,
                             trained_on=trained_on or f"index {self.store.root}", power=power)

    def _refresh_vectors(self) -> None:
        if self.store.stale_segments(self.whitening_tag):
            self.store.refresh_vectors(lambda local: self.recipe.finalize(local, self.whitening), self.whitening_tag)

    # ------------------------------------------------------------------ indexing
    def add_folder(self, photos: str | os.PathLike | Iterable[str | os.PathLike], *, batch: int = 32,
                   progress: bool = True, on_error: Callable[[str, str], None] | None = None,
                   extract: Callable[[list[Path]], Iterator] | None = None) -> IndexReport:
        """Index every image under ``photos`` that is new or changed; bad files are reported, not fatal.

        ``extract(paths)`` yields, in order, ``(path, (local, fmap, (width, height)) or an error, stat, sha256)``
        for each path to describe; the default (:meth:`extract`) decodes and runs the network here, and
        ``index.distributed.RayExtractor`` runs it on a Ray cluster (the bookkeeping below is the same).
        """
        report = IndexReport()

        def skipped(path: Path, why: str) -> None:  # FIFOs, devices, symlink loops ...: named, the batch goes on
            report.failed.append((str(path), why))
            if on_error:
                on_error(str(path), why)

        paths = (list_images(photos, on_skip=skipped) if isinstance(photos, (str, os.PathLike))
                 else [Path(p) for p in photos])
        known = self.store.path_index()
        todo: list[Path] = []
        replaced: list[int] = []
        for p in paths:
            key = str(p.resolve())
            rec = known.get(key)
            if rec is not None:
                try:
                    st = p.stat()
                except OSError as exc:
                    report.failed.append((str(p), str(exc)))
                    continue
                if rec["size"] == st.st_size and rec["mtime"] == st.st_mtime:
                    report.unchanged.append(key)
                    continue
                if rec["size"] == st.st_size and file_sha256(p) == rec["sha256"]:
                    report.unchanged.append(key)
                    continue
                replaced.append(rec["id"])
                report.updated.append(key)
            todo.append(p)
        pending: list[Entry] = []
        store_maps = self.store.settings.get("store_maps", True)
        bar = progress_bar(len(todo), "indexing", progress)
        try:
            for path, res, st, sha in (extract or self.extract)(todo):
                if isinstance(res, Exception):
                    report.failed.append((str(path), str(res)))
                    if on_error:
                        on_error(str(path), str(res))
                    bar.update(1)
                    continue
                local, fmap, (width, height) = res
                key = str(path.resolve())
                pending.append(Entry(path=key, width=width, height=height, sha256=sha, mtime=st.st_mtime,
                                     size=st.st_size, local=local, fmap=fmap if store_maps else None,
                                     vector=self.recipe.finalize(local, self.whitening)))
                if key not in report.updated:
                    report.added.append(key)
                bar.update(1)
                if len(pending) >= batch:
                    self.store.add(pending, tag=self.whitening_tag)
                    pending = []
            if pending:
                self.store.add(pending, tag=self.whitening_tag)
        finally:
            bar.close()
        if replaced:
            self.store.remove(replaced)
        if self.store.settings.get("whitening_mode") == "self" and self.whitening is None and len(self.store):
            local = self.store.local_descriptors()
            n_rows, dim = sum(len(x) for x in local), local[0].shape[1]
            if len(local) >= self.MIN_SELF_WHITENING_IMAGES and n_rows >= 2 * dim:
                w = fit_whitening(np.concatenate(local), dim=self.recipe.whitening_dim,
                                  trained_on=f"index {self.store.root}")
                self.set_whitening(w)
                report.whitening = (f"whitening learned on this collection itself ({w.n_samples} local vectors, "
                                    f"{w.dim}-D); for benchmark numbers learn it on another collection")
            else:
                report.whitening = (f"not whitened: {len(self.store)} images / {n_rows} local vectors are too few "
                                    f"to learn a {dim}-D whitening (need {self.MIN_SELF_WHITENING_IMAGES} images "
                                    f"and {2 * dim} vectors; it is learned once the collection has them, or "
                                    f"use `isearch whitening learn` on another collection)")
        self._faiss = None
        return report

    def extract(self, paths: Sequence[Path]) -> Iterator:
        """``(path, (local, fmap, (width, height)) or ImageError, stat, sha256)`` per path, in order: JPEG
        decoding in threads, overlapped with this process's forward passes."""
        max_size = self.recipe.max_size
        for path, img, st, sha in prefetch(lambda p: _decode(p, max_size), paths):
            if isinstance(img, Exception):
                yield path, img, st, sha
            else:
                try:
                    local, fmap = self.describer.describe(img)
                except ValueError as exc:  # e.g. fewer pixels than the network's stride: report it, go on
                    yield path, ImageError(f"{path}: cannot be described ({exc})"), st, sha
                    continue
                yield path, (local, fmap, img.info.get("original_size", img.size)), st, sha

    def remove_paths(self, paths: Iterable[str | os.PathLike]) -> int:
        known = self.store.path_index()
        ids = []
        for p in paths:
            rec = known.get(str(Path(p).resolve())) or known.get(str(p))
            if rec is None:
                raise KeyError(f"{p}: not in the index {self.store.root}")
            ids.append(rec["id"])
        n = self.store.remove(ids)
        self._faiss = None
        return n

    # ------------------------------------------------------------------ search
    def describe(self, image: str | os.PathLike | Image.Image, box: Box | Sequence[float] | str | None = None):
        """(global vector, local vectors, feature map) of a query image, cropped to ``box`` first."""
        if isinstance(image, Image.Image):
            img = image.convert("RGB")
            if box is not None:
                from .images import clip_box, resize_max

                b = box if isinstance(box, Box) else parse_box(box)
                img = img.crop(clip_box(b, img.width, img.height, name="query image"))
                img = resize_max(img, self.recipe.max_size)
            else:
                from .images import resize_max

                img = resize_max(img, self.recipe.max_size)
        else:
            img = load_image(image, max_size=self.recipe.max_size, box=box)
        try:
            local, fmap = self.describer.describe(img)
        except ValueError as exc:  # e.g. fewer pixels than the network's stride: name the query
            name = "query image" if isinstance(image, Image.Image) else str(image)
            raise ImageError(f"{name}: cannot be described ({exc})") from exc
        return self.recipe.finalize(local, self.whitening), local, fmap

    def _ensure_faiss(self):
        if self._faiss is None:
            self._records = self.store.records()
            if self.store.stale_segments(self.whitening_tag):
                vecs = self.recipe.finalize(self.store.local_descriptors(), self.whitening)
            else:
                vecs = self.store.vectors()
            self._faiss = build_faiss(vecs, self.faiss_kind) if len(vecs) else None
        return self._faiss

    def faiss_index(self):
        """The first-stage FAISS index over the stored global vectors (rows in :meth:`records` order); ``None``
        for an empty collection. Built on first use, kept until the index changes (:meth:`invalidate`)."""
        return self._ensure_faiss()

    def invalidate(self) -> None:
        """Forget the FAISS index and records, e.g. after another process added images (rebuilt on next use)."""
        self._faiss = None
        self._records = None

    @property
    def search_state(self):
        """What searching keeps between queries (re-rankers with their caches, DBA vectors; see search.py)."""
        return self._search_state

    def vectors_of(self, ids: Sequence[int]) -> np.ndarray:
        """The stored global vectors of ``ids`` (KeyError naming an id that is not in the index)."""
        index = self._ensure_faiss()
        pos = {r["id"]: k for k, r in enumerate(self._records or [])}
        missing = [int(i) for i in ids if int(i) not in pos]
        if missing or index is None:
            raise KeyError(f"image id {missing[0] if missing else ids[0]} is not in the index {self.store.root}")
        return np.stack([index.reconstruct(int(pos[int(i)])) for i in ids])

    def vectors(self) -> np.ndarray:
        self._ensure_faiss()
        return self._faiss.reconstruct_n(0, self._faiss.ntotal) if self._faiss is not None else np.zeros((0, 0))

    def records(self) -> list[dict[str, Any]]:
        if self._records is None:
            self._records = self.store.records()
        return self._records

    @property
    def aml_fast_options(self) -> dict[str, Any]:
        """Default options of ``rerank="aml-fast"`` (K query channels, pooling g, window step; rerank/base.py)."""
        return self.rerank_options.setdefault("aml-fast", {})

    @aml_fast_options.setter
    def aml_fast_options(self, options: dict[str, Any]) -> None:
        self.rerank_options["aml-fast"] = dict(options)

    def search_vector(self, vector: np.ndarray, top: int = 10) -> list[Hit]:
        """The ``top`` indexed images by inner product with ``vector`` (:func:`instance_search.search.search_vector`)."""
        from . import search as S

        return S.search_vector(self, vector, top)

    def search(self, image: str | os.PathLike | Image.Image, box=None, top: int = 10, *,
               rerank: str | None = None, shortlist: int = 1000, qe: int = 0, qe_kind: str = "avg",
               detector: str | os.PathLike | None = None, rerank_options: dict[str, Any] | None = None,
               qe_options: dict[str, Any] | None = None, first_stage: str | None = None) -> list[Hit]:
        """Ranked hits for a query image (optionally its box; ``first_stage``: with a box, rank with its crop
        (``"box"``, the revisited protocol) or with the whole image (``"image"``, Salvador et al. 2016), ``None``
        the recipe's choice):
        first stage -> the top ``shortlist`` re-ranked by ``rerank`` (``none``, ``aml``, ``aml-fast``, ``aml-c2f``,
        ``casr``, ``cs-sr`` with its ``detector`` file; options in ``rerank_options`` over :attr:`rerank_options`), with
        boxes -> query expansion with the top ``qe`` (``qe_kind``: ``avg``, ``alpha``, ``dba``; ``qe_options``).
        See :func:`instance_search.search.search`."""
        from . import search as S

        return S.search(self, image, box, top, rerank=rerank, shortlist=shortlist, qe=qe, qe_kind=qe_kind,
                        detector=detector, rerank_options=rerank_options, qe_options=qe_options,
                        first_stage=first_stage)

    def search_indexed(self, image_id: int, top: int = 10, *, rerank: str | None = None, shortlist: int = 1000,
                       qe: int = 0, qe_kind: str = "avg", detector: str | os.PathLike | None = None,
                       rerank_options: dict[str, Any] | None = None,
                       qe_options: dict[str, Any] | None = None) -> list[Hit]:
        """Like :meth:`search`, with an indexed image as the query ("more like this"): its stored vector and
        stored conv map are used, no network pass. The image itself is among the hits."""
        from . import search as S

        return S.search_indexed(self, image_id, top, rerank=rerank, shortlist=shortlist, qe=qe, qe_kind=qe_kind,
                                detector=detector, rerank_options=rerank_options, qe_options=qe_options)

    def _rerank(self, hits: list[Hit], qmap: np.ndarray, method: str, shortlist: int,
                qglobal: np.ndarray | None = None) -> tuple[list[Hit], dict[int, np.ndarray]]:
        """Re-rank the first ``shortlist`` hits with the re-ranking named ``method``
        (:func:`instance_search.search.rerank_hits`): (hits, vector each re-ranked image was scored with)."""
        from . import search as S

        return S.rerank_hits(self, hits, qmap, S.reranker_for(self, method), shortlist, qglobal)

    def __len__(self) -> int:
        return len(self.store)

    def stats(self) -> dict[str, Any]:
        info = self.store.whitening_info
        return {"index": str(self.store.root), "images": len(self.store), "recipe": self.recipe.to_dict(),
                "whitening": info, "segments": len(self.store.manifest["segments"])}
