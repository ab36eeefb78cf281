"""`isearch` training commands: everything that trains a model for a recipe or a re-ranker.

=============  ==========================================================================  ====================
command        what it trains / writes                                                     paper
=============  ==========================================================================  ====================
``clean``      groups cleaned + object boxes estimated (a boxes JSON)                      Gordo 2016, S. 4.1
``train-rmac`` learned R-MAC with hard triplets (``--recipe learned-rmac --model``)        Gordo 2016, S. 3.1
``train-rpn``  a region proposal network on a boxes file (``--recipe rpa``, ``--rpn``)     Gordo 2016, S. 3.2
``finetune``   the CS-SR detector fine-tuned on query instances, strategy #1 / #2          Salvador 2016, S. 3.2
=============  ==========================================================================  ====================

Each model file is a plain state dict (``.pt``, written atomically, read back with ``weights_only=True``) with a
JSON config beside it holding its sha256, the training data and the history.

``--device auto|cpu|cuda`` (``clean``, ``train-rmac``, ``train-rpn``, ``finetune``): where the networks, batches and
losses run (``clean``: the ratio test's descriptor distances; SIFT and RANSAC stay on the CPU; ``finetune``: the
conv layers that strategy #2 trains). ``cuda`` without a GPU is
refused before anything is written; model files and checkpoints hold CPU tensors, so a model trained on a GPU
loads on a CPU-only machine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import expected_errors as _expected
from .common import fail as _fail
from .common import message as _msg
from .device import DEVICE, resolve_device
from .main import app


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected comma-separated numbers") from None
    if not vals:
        raise ValueError(f"{what} {text!r}: expected comma-separated numbers")
    return vals


def _model_line(path: Path) -> str:
    import json

    cfg = json.loads(path.with_suffix(".json").read_text())
    return f"model: {path} (+ {path.with_suffix('.json').name}), sha256 {cfg.get('state_sha256', '?')[:16]}…"


@app.command("clean")
def clean_cmd(
    folder: Optional[Path] = typer.Argument(None, help="Folder of groups (one sub-folder per object/place). "
                                                       "Default: the built-in training split."),
    out: Path = typer.Option(..., "--out", help="Boxes JSON to write."),
    data: Optional[Path] = typer.Option(None, help="Benchmark data folder for the built-in split "
                                                   "(default: ../shared/data)."),
    max_side: int = typer.Option(512, "--max-side", help="SIFT runs on images shrunk to this many pixels."),
    min_inliers: int = typer.Option(10, "--min-inliers", help="Inliers for a verified pair (graph edge)."),
    ratio: float = typer.Option(0.8, help="First-to-second-neighbour ratio test."),
    alpha: float = typer.Option(0.1, help="Box diffusion rate."),
    cache: Optional[Path] = typer.Option(None, help="Folder to cache SIFT features in."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    device: str = DEVICE,
) -> None:
    """Clean groups and estimate object boxes (Gordo et al. 2016, Sec. 4.1): SIFT + affine RANSAC per pair,
    largest connected component per group, box diffusion. Writes {image: group, kept, box, ...}."""
    from ..train.cleaning import CleaningParams, clean_and_box, groups_from_folder, save_boxes

    try:
        dev = resolve_device(device)
        if folder is None:
            from ..eval.datasets.benchmarks import find_shared_data
            from ..eval.datasets.splits import training_set

            root = Path(data) if data is not None else find_shared_data()
            if root is None or not Path(root).is_dir():
                raise FileNotFoundError(f"benchmark data folder not found: {data!r} (expected ../shared/data)")
            root = Path(root)
            ts = training_set(root)
        else:
            root = Path(folder)
            ts = groups_from_folder(root)
        params = CleaningParams(max_side=max_side, min_inliers=min_inliers, ratio=ratio, alpha=alpha)
        res = clean_and_box(ts, root=root, params=params, cache_dir=cache, progress=not quiet, device=dev)
        save_boxes(res, out)
    except _expected() as exc:
        _fail(_msg(exc))
    st = res.stats
    for msg in st["failed"]:
        typer.secho(f"skipped {msg}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"{out}: kept {st['kept']} of {st['images']} images in {st['groups']} groups; "
               f"{st['pairs_verified']} of {st['pairs_matched']} pairs verified ({st['seconds_total']:.1f} s)")


@app.command("train-rmac")
def train_rmac(
    checkpoint_dir: Path = typer.Option(Path("runs/learned-rmac"), "--checkpoint-dir",
                                        help="Checkpoints, per-epoch models, model.pt (+ .json), loss_curve.png."),
    epochs: int = typer.Option(3, help="Epochs (one epoch: every training image once as the query)."),
    lr: float = typer.Option(1e-3, help="SGD learning rate."),
    momentum: float = typer.Option(0.9),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    margin: float = typer.Option(0.1, help="Triplet margin m (Gordo et al. 2016: 0.1)."),
    batch: int = typer.Option(16, help="Triplets per SGD update (gradients accumulated)."),
    micro_batch: int = typer.Option(8, "--micro-batch", help="Triplets per forward/backward pass."),
    remine_every: int = typer.Option(4, "--remine-every", help="Updates between two hard-triplet minings."),
    mine_pool: int = typer.Option(0, "--mine-pool", help="Candidate negatives per mining (0: all training images)."),
    anchors_per_epoch: int = typer.Option(0, "--anchors-per-epoch", help="Queries per epoch (0: all)."),
    train_layers: str = typer.Option("conv5", "--train-layers",
                                     help="head | conv5_3 | conv5 | conv4 | all (lower layers frozen and cached)."),
    max_size: int = typer.Option(384, "--max-size", help="Longer side of the training images in pixels."),
    engine: str = typer.Option("auto", help="Engine of the frozen layers (the trained ones run exact): auto (winograd "
                                            "on the CPU, exact on a GPU) | exact | winograd (CPU, ~2x faster)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache of the frozen layers' outputs "
                                                                       "(default: CHECKPOINT_DIR/inputs)."),
    data: Optional[Path] = typer.Option(None, help="Benchmark data folder (default: ../shared/data)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from CHECKPOINT_DIR/checkpoint.pt."),
    seed: int = typer.Option(0),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    device: str = DEVICE,
) -> None:
    """Train learned R-MAC (Gordo et al. 2016, Sec. 3.1) with hard triplets on the training split
    (Holidays-811 + UKBench 0-499); use it with
    `isearch index --recipe learned-rmac --model CHECKPOINT_DIR/model.pt`."""
    from ..train.triplet import TrainConfig, train_on_split

    try:
        dev = resolve_device(device)
        cfg = TrainConfig(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, margin=margin,
                          batch=batch, micro_batch=micro_batch, remine_every=remine_every, mine_pool=mine_pool,
                          anchors_per_epoch=anchors_per_epoch, seed=seed)
        _, history, model_path = train_on_split(checkpoint_dir, cfg, train_layers=train_layers, max_size=max_size,
                                                data_dir=data, cache_dir=cache_dir, engine=engine, resume=resume,
                                                progress=not quiet, device=dev)
    except _expected() as exc:
        _fail(_msg(exc))
    for e in history["epochs"]:
        typer.echo(f"epoch {e['epoch'] + 1}: {e['seconds']:.0f} s ({e['updates']} updates, mining "
                   f"{e['mine_seconds']:.0f} s), mean batch loss {e['mean_batch_loss']:.4f}, mean mined loss "
                   f"{e['mean_mined_loss']:.4f}")
    typer.echo(f"model: {model_path} (+ {model_path.with_suffix('.json').name}); loss curve: "
               f"{checkpoint_dir / 'loss_curve.png'}")


@app.command("train-rpn")
def train_rpn_cmd(
    boxes: Path = typer.Argument(..., help="Boxes file from `isearch clean` (the kept images and their boxes)."),
    out: Path = typer.Option(..., "--out", help="Model file to write (.pt; its config goes next to it as .json)."),
    root: Optional[Path] = typer.Option(None, help="Folder the boxes file's image paths are relative to "
                                                   "(default: the one it records)."),
    epochs: int = typer.Option(4, help="Passes over the training images."),
    lr: float = typer.Option(1e-3, help="SGD learning rate (Ren et al. 2015: 1e-3)."),
    lr_drop_epoch: int = typer.Option(0, "--lr-drop-epoch", help="From this epoch on, lr x 0.1 (0: never)."),
    images_per_batch: int = typer.Option(2, "--images-per-batch", help="Images per SGD update."),
    mid: int = typer.Option(256, help="Channels of the RPN's 3x3 conv (Ren et al.: 512 with VGG16)."),
    sizes: str = typer.Option("48,96,192,384", help="Anchor sizes in pixels, comma-separated."),
    max_size: int = typer.Option(384, "--max-size", help="Longer image side in pixels; describe images at the "
                                                         "same size when using the RPN."),
    val_groups: float = typer.Option(0.1, "--val-groups", help="Share of the groups held out for a validation loss."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir",
                                                  help="Checkpoints and the map cache (default: OUT-run/ beside OUT)."),
    weights: Optional[str] = typer.Option(None, help="VGG16 weights source or local .pt file."),
    engine: str = typer.Option("auto", help="Engine of the frozen VGG16 (the RPN itself runs exact): auto (winograd "
                                            "on the CPU, exact on a GPU) | exact | winograd (CPU, ~2x faster)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue after the last epoch checkpoint."),
    seed: int = typer.Option(0),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    device: str = DEVICE,
) -> None:
    """Train a region proposal network (Ren et al. 2015; Gordo et al. 2016, Sec. 3.2) on VGG16 conv5_3 maps of
    the kept images of a boxes file, their estimated boxes as ground truth. Use it with
    `isearch index --recipe rpa --rpn OUT` or `--recipe learned-rmac --regions rpn --rpn OUT`."""
    from ..train.rpn import RPNTrainConfig, train_rpn_on_boxes

    try:
        dev = resolve_device(device)
        cfg = RPNTrainConfig(epochs=epochs, lr=lr, lr_drop_epoch=lr_drop_epoch, images_per_batch=images_per_batch,
                             seed=seed)
        _, history, path, summary = train_rpn_on_boxes(
            boxes, root, out, config=cfg, max_size=max_size, mid_channels=mid, sizes=_floats(sizes, "--sizes"),
            val_groups=val_groups, checkpoint_dir=checkpoint_dir, weights=weights, engine=engine, resume=resume,
            progress=not quiet, device=dev)
    except _expected() as exc:
        _fail(_msg(exc))
    typer.echo(f"trained on {summary['train_images']} images ({summary['validation_images']} held out) of "
               f"{summary['groups']} groups, {summary['kept_images']} kept in {boxes}")
    for e in history["epochs"]:
        val = f"; validation cls {e['val_cls']:.4f} reg {e['val_reg']:.4f}" if "val_cls" in e else ""
        typer.echo(f"epoch {e['epoch']}: {e['seconds']:.0f} s, lr {e['lr']:g}, train cls {e['train_cls']:.4f} "
                   f"reg {e['train_reg']:.4f}{val}")
    typer.echo(_model_line(path))


@app.command("finetune")
def finetune_cmd(
    queries: Path = typer.Argument(..., help='Queries JSON: {"queries": [{"image": PATH, "box": [x1, y1, x2, y2], '
                                             '"class": NAME}, ...]}, paths relative to the file.'),
    out: Path = typer.Option(..., "--out", help="Detector file to write (.pt; its config goes next to it as .json)."),
    strategy: int = typer.Option(1, help="1: fine-tune the FC layers; 2: all layers after conv1_1-1_2 "
                                         "(conv2_1..conv5_3), the RPN and the FC layers (Salvador et al. 2016, "
                                         "Sec. 3.2)."),
    base: Optional[Path] = typer.Option(None, help="Base detector to start from (e.g. OUT-base.pt of an earlier run)."),
    boxes: Optional[Path] = typer.Option(None, help="Without --base: a boxes file from `isearch clean` to train the "
                                                    "base detector on (its groups as classes)."),
    rpn: Optional[Path] = typer.Option(None, "--rpn", help="Without --base: the RPN from `isearch train-rpn`."),
    root: Optional[Path] = typer.Option(None, help="Folder of the boxes file's images (default: the one it records)."),
    epochs: int = typer.Option(20, help="Phase 1 (both strategies): passes training the FC layers."),
    lr: float = typer.Option(3e-3, help="Phase 1 learning rate."),
    epochs_2: int = typer.Option(4, "--epochs-2", help="Phase 2: passes training the strategy's layers."),
    lr_2: float = typer.Option(1e-3, "--lr-2", help="Phase 2 learning rate."),
    base_epochs: int = typer.Option(2, "--base-epochs", help="Passes of the base detector's training."),
    base_lr: float = typer.Option(1e-2, "--base-lr"),
    pool: int = typer.Option(3, help="RoI pooling output size."),
    hidden: int = typer.Option(1024, help="fc6 / fc7 width."),
    max_size: int = typer.Option(384, "--max-size", help="Longer image side in pixels (as the RPN was trained)."),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir",
                                                  help="Checkpoints and the map cache (default: OUT-run/ beside OUT)."),
    weights: Optional[str] = typer.Option(None, help="VGG16 weights source or local .pt file."),
    engine: str = typer.Option("exact", help="exact | winograd (VGG16, ~2x faster)."),
    seed: int = typer.Option(0),
    device: str = DEVICE,
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Fine-tune the CS-SR detector on query instances (Salvador et al. 2016, Sec. 3.2): every query class plus
    background, the query images and their horizontal flips as training data; strategy #1 or #2."""
    from ..train.detector import FinetuneConfig, finetune_on_queries

    try:
        dev = resolve_device(device)
        cfg = FinetuneConfig(strategy=strategy, epochs=epochs, lr=lr, epochs_2=epochs_2, lr_2=lr_2,
                             base_epochs=base_epochs, base_lr=base_lr, pool=pool, hidden=hidden, seed=seed)
        _, info, path = finetune_on_queries(queries, out, config=cfg, base=base, rpn_file=rpn, boxes_file=boxes,
                                              root=root, max_size=max_size, checkpoint_dir=checkpoint_dir,
                                              weights=weights, engine=engine, progress=not quiet, device=dev)
    except _expected() as exc:
        _fail(_msg(exc))
    b = info["base"]
    if "trained_on" in b:
        typer.echo(f"base detector: {b['trained_on']['train_images']} images of {b['trained_on']['groups']} groups, "
                   f"{len(b['history'])} epochs -> {b['file']}")
    else:
        typer.echo(f"base detector: {b['file']}")
    for phase, hist in info["history"].items():
        for e in hist:
            typer.echo(f"{phase} epoch {e['epoch']}: {e['seconds']:.0f} s, cls {e.get('train_cls', float('nan')):.4f}"
                       f" reg {e.get('train_reg', float('nan')):.4f}")
    typer.echo(f"strategy #{strategy}: {info['queries']} queries, {len(info['classes'])} classes "
               f"({', '.join(info['classes'][:8])}{', …' if len(info['classes']) > 8 else ''})")
    typer.echo(_model_line(path))
