"""A faster CPU engine for VGG-style trunks: Winograd F(4x4, 3x3) convolution in plain torch.

Every 3x3 / stride 1 / padding 1 convolution of the trunk is computed with the minimal-filtering algorithm of
Winograd as used by Lavin & Gray (2016), "Fast algorithms for convolutional neural networks": the image is cut
into 6x6 tiles overlapping by 2 (stride 4); each tile ``d`` and each 3x3 filter ``g`` are mapped into a 6x6
"Winograd domain" (``Bᵀ d B`` and ``G g Gᵀ``), where the convolution becomes 36 independent matrix products
(one per position of the 6x6 domain) of shape ``(tiles, Cin) @ (Cin, Cout)``; the 4x4 output tile is
``Aᵀ m A``. This does 2.25x fewer multiplications per output than direct convolution (36 per 4x4 outputs instead
of 144), so on a CPU where direct fp32 convolution is bound by the matmul peak, the engine can go well below
that bound. In fp32 the result differs from direct convolution by a relative error of about 1e-6 per layer
(tested against :func:`torch.nn.functional.conv2d`).

Implementation notes (all plain torch, no Python loop over tiles or channels):

* activations stay in an NHWC layout inside zero-bordered buffers, so the gathering of overlapping 6x6 tiles
  is one strided copy moving contiguous channel vectors, and the output tiles scatter back the same way;
* the image is processed in horizontal strips of tile rows so the transformed tensors of a strip stay in the
  CPU caches; all per-strip work tensors come from a reused workspace;
* the input transform is two small matmuls with ``Bᵀ`` (rows, then columns), the output transform one matmul
  with ``Aᵀ⊗Aᵀ`` (16x36); the bias is added in the Winograd domain at the one position whose output row of
  ``Aᵀ`` is all ones (1/36 of the data), ReLU is fused into the scatter copy, and a 2x2 max-pool that follows
  a convolution is done on the 4x4 output tiles before they are written (pool windows never straddle tiles);
* the first convolution (3 input channels) is an im2col matmul (K=27), which is cheaper than Winograd there;
* parallelism (``parallel='strips'``, the default): the strips of a layer are shared out to
  ``torch.get_num_threads()`` worker threads that each run single-threaded torch ops, instead of running every
  small op on all threads (``parallel='omp'``). Both are equally fast on an idle machine, but each OpenMP op
  ends in a barrier, and when other processes compete for the cores a descheduled thread stalls the others
  at every op: with the load of a few test runs beside it, the OpenMP variant was measured 10x slower, the
  strip workers degrade in proportion to the CPU share they get.

Public API:

* :func:`winograd_conv2d` -- a drop-in for ``F.conv2d(x, w, b, padding=1)`` (optionally followed by ReLU and a
  2x2 max-pool), for testing and reuse;
* :class:`WinogradVGGTrunk` -- an ``nn.Module`` running a chain of conv3x3/ReLU/maxpool layers and returning the
  requested named feature maps (NCHW, float32);
* :func:`winograd_trunk` / :func:`use_engine` -- build the fast trunk for a loaded VGG16 backbone, and swap it in
  and out (``'exact'`` restores the original module).
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ISearchError
from .fast_lite import FoldedLite0
from .folding import fold_batchnorm
from .workspace import Workspace as _Workspace

__all__ = [
    "ENGINES",
    "EngineError",
    "FoldedLite0",
    "FoldedResNet50",
    "fold_batchnorm",
    "WinogradVGGTrunk",
    "engine_of",
    "resolve_engine",
    "transform_weight",
    "use_engine",
    "winograd_conv2d",
    "winograd_trunk",
]

#: ``auto`` (the default everywhere) is resolved by :func:`resolve_engine` to one of the others.
ENGINES = ("auto", "exact", "winograd", "folded")


class EngineError(ISearchError, ValueError):
    """An engine name that does not exist, or an engine that cannot run this backbone / device (the message
    names both)."""


def resolve_engine(backbone_name: str | None, device="cpu", engine: str = "auto") -> str:
    """The engine that runs ``backbone_name`` on ``device`` when ``engine`` is asked for: the one place where
    ``auto`` is decided.

    ``auto`` is ``winograd`` on the CPU for VGG16 (Winograd F(4x4, 3x3), :class:`WinogradVGGTrunk`) and for
    ResNet-50 (BatchNorm folded, channels-last, Winograd for its 3x3 stride-1 convolutions:
    :class:`FoldedResNet50` with ``winograd=True``), ``folded`` on the CPU for EfficientNet-Lite0 (BatchNorm
    folded, NHWC, 1x1 convolutions as matmuls: :class:`~instance_search.backbones.fast_lite.FoldedLite0`), and
    ``exact`` (the fp32 network) for any other backbone or on a GPU. The fast engines agree with the exact
    network to a cosine >= 0.99999 of MAC / R-MAC on real photos (tests/backbones/test_fast.py,
    tests/backbones/test_fast_lite.py). An explicit engine is returned as it is after checking that it can run
    there (``winograd`` and ``folded`` are CPU-only; ``folded`` is for ResNet-50 and EfficientNet-Lite0;
    ``winograd`` for VGG16 and ResNet-50). Raises :class:`EngineError` naming the engine otherwise.
    """
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    name = str(backbone_name) if backbone_name is not None else None
    cpu = torch.device(device).type == "cpu"
    if engine == "auto":
        if not cpu:
            return "exact"
        return {"vgg16": "winograd", "resnet50": "winograd", "efficientnet-lite0": "folded"}.get(name, "exact")
    if engine == "exact":
        return engine
    if not cpu:
        raise EngineError(f"the {engine} engine runs on the CPU only, not on {device} (use --engine exact or auto)")
    if engine == "winograd" and name not in ("vgg16", "resnet50", None):
        raise EngineError(f"the winograd engine supports VGG16 and ResNet-50, not {name!r}")
    if engine == "folded" and name not in ("resnet50", "efficientnet-lite0"):
        raise EngineError(f"the folded engine is for ResNet-50 and EfficientNet-Lite0 (BatchNorm folding), "
                          f"not {name!r}")
    return engine

# --------------------------------------------------------------------------------------------------------
# F(4x4, 3x3) matrices, interpolation points 0, 1, -1, 2, -2 and infinity.
# --------------------------------------------------------------------------------------------------------
_BT64 = torch.tensor(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=torch.float64,
)
_G64 = torch.tensor(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=torch.float64,
)
_AT64 = torch.tensor(
    [
        [1, 1, 1, 1, 1, 0],
        [0, 1, -1, 2, -2, 0],
        [0, 1, 1, 4, 4, 0],
        [0, 1, -1, 8, -8, 1],
    ],
    dtype=torch.float64,
)
_BT = _BT64.float()
_BT_BATCH = _BT.expand(6, 6, 6)  # one copy of Bᵀ per row of the domain, for the column pass (a bmm)
_AT = _AT64.float()
_AT_BATCH = _AT.expand(4, 4, 6)
_KA = torch.kron(_AT64, _AT64).float().contiguous()  # (16, 36): the whole output transform in one matmul
_KG = torch.kron(_G64, _G64)  # (36, 9)
#: The domain position whose column of Aᵀ⊗Aᵀ is all ones: a constant added there adds to all 16 outputs.
_BIAS_POS = 1 * 6 + 1
assert bool((_KA[:, _BIAS_POS] == 1).all())

_TILE = 4  # output tile side
_DOM = 6  # domain tile side


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """``G g Gᵀ`` for every filter: (Cout, Cin, 3, 3) -> (36, Cin, Cout) float32 (computed in float64)."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"transform_weight: expected a (Cout, Cin, 3, 3) weight, got {tuple(weight.shape)}")
    cout, cin = weight.shape[:2]
    u = _KG @ weight.detach().to(torch.float64).reshape(cout * cin, 9).T  # (36, cout*cin)
    return u.reshape(36, cout, cin).transpose(1, 2).contiguous().float()


def _tiles(n: int) -> int:
    return (n + _TILE - 1) // _TILE


# --------------------------------------------------------------------------------------------------------
# Buffers
# --------------------------------------------------------------------------------------------------------
def _padded(ws: _Workspace, name: str, b: int, h: int, w: int, c: int, rows: int, cols: int) -> torch.Tensor:
    """An NHWC buffer of at least (rows, cols) whose image of size (h, w) sits at offset (1, 1).

    Only the first row and column are zeroed here; whatever is written beyond the image must be zeroed by
    :func:`_zero_outside` once written.
    """
    buf = ws.get(name, (b, rows, cols, c))
    buf[:, 0].zero_()
    buf[:, :, 0].zero_()
    return buf


def _zero_outside(buf: torch.Tensor, h: int, w: int) -> None:
    buf[:, 1 + h :].zero_()
    buf[:, :, 1 + w :].zero_()


def _buffer_size(h: int, w: int, written_rows: int, written_cols: int) -> tuple[int, int]:
    """Rows/cols of a padded buffer holding an (h, w) image read by a Winograd layer and written as a grid."""
    return (max(_DOM - 2 + _TILE * _tiles(h), 1 + written_rows), max(_DOM - 2 + _TILE * _tiles(w), 1 + written_cols))


# --------------------------------------------------------------------------------------------------------
# One Winograd layer on NHWC buffers
# --------------------------------------------------------------------------------------------------------
def _strip_tiles(cin: int, cout: int) -> int:
    """Tiles per strip (rounded to whole tile rows), chosen by measurement on an AVX2 CPU: small strips keep
    the 36 transformed planes of small-channel layers in cache; deep layers want longer GEMMs."""
    return 64 if max(cin, cout) <= 256 else 768


class _StripPool:
    """Worker threads that each run whole strips with one intra-op thread (and their own workspace).

    With torch's OpenMP parallelism every one of the ~15 small ops of a strip ends in a barrier of all
    threads; on a machine shared with other processes a descheduled thread then stalls the others at every
    op. Independent strips per worker (dynamic scheduling) degrade gracefully instead.
    """

    def __init__(self, workers: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.workers = workers
        self._local = threading.local()
        self._all: list[_Workspace] = []
        self._all_lock = threading.Lock()
        main_threads = torch.get_num_threads()
        self._ready = threading.Barrier(workers + 1)
        self._ex = ThreadPoolExecutor(workers, thread_name_prefix="winograd", initializer=self._init)
        # start the threads now, so that each sets its own thread count while we wait
        for _ in range(workers):
            self._ex.submit(self._ready.wait)
        self._ready.wait()
        torch.set_num_threads(main_threads)  # set_num_threads in a worker also sets the default for new threads

    def _init(self) -> None:
        # torch initialises a thread's OpenMP/MKL thread counts lazily, from a process-wide default, on its
        # first parallel op: trigger that first, then set this thread's own counts (thread-local) to one
        torch.get_num_threads()
        torch.set_num_threads(1)
        ws = _Workspace()
        self._local.ws = ws
        with self._all_lock:
            self._all.append(ws)

    def run(self, fn, items) -> None:
        def task(item):
            with torch.inference_mode():  # thread-local: the caller's buffers are inference tensors
                fn(item, self._local.ws)

        futures = [self._ex.submit(task, it) for it in items]
        for f in futures:
            f.result()

    def nbytes(self) -> int:
        return sum(ws.nbytes() for ws in self._all)

    def clear(self) -> None:
        for ws in self._all:
            ws.clear()

    def shutdown(self) -> None:
        self._ex.shutdown(wait=False)


def _wino_layer(
    xp: torch.Tensor,
    h: int,
    w: int,
    u: torch.Tensor,
    bias: torch.Tensor | None,
    relu: bool,
    pool: bool,
    dst: torch.Tensor,
    ws: _Workspace,
    strip_tiles: int | None = None,
    workers: _StripPool | None = None,
) -> None:
    """3x3 convolution (padding 1) of the (h, w) image at offset (1, 1) of the NHWC buffer ``xp``.

    Writes the output tile grid (4*ceil(h/4) rows, or half that when ``pool``) at ``dst[:, 0, 0]`` onwards;
    ``dst`` is an NHWC view. ``relu`` and ``pool`` (2x2 max, stride 2) are applied when asked. Strips of tile
    rows run one after the other here, or spread over ``workers``.
    """
    bsz, _, _, cin = xp.shape
    cout = u.shape[2]
    th, tw = _tiles(h), _tiles(w)
    per_row = bsz * tw
    rows = max(1, min(th, (strip_tiles or _strip_tiles(cin, cout)) // per_row))
    if workers is not None and workers.workers > 1:
        # at least two strips per worker when the layer is small, for balance
        rows = max(1, min(rows, th // (2 * workers.workers)))
    strips = [(t0, min(rows, th - t0)) for t0 in range(0, th, rows)]

    def one(strip, wsp):
        _wino_strip(xp, h, w, u, bias, relu, pool, dst, wsp, strip[0], strip[1], rows)

    if workers is None or workers.workers <= 1 or len(strips) == 1:
        for strip in strips:
            one(strip, ws)
    else:
        workers.run(one, strips)


def _wino_strip(xp, h, w, u, bias, relu, pool, dst, ws, t0: int, nt: int, rows: int) -> None:
    """One strip of ``nt`` tile rows starting at tile row ``t0`` (see :func:`_wino_layer`)."""
    bsz, _, wp, cin = xp.shape
    cout = u.shape[2]
    tw = _tiles(w)
    per_row = bsz * tw
    s_b, s_h, s_w, s_c = xp.stride()
    d_b, d_h, d_w, d_c = dst.stride()
    f = 2 if pool else _TILE
    n = nt * per_row
    n_max = rows * per_row  # buffers sized for the largest strip of the layer: no regrowth within a layer
    base = xp.storage_offset()
    v = ws.get("v", (36 * n_max * cin,))[: 36 * n * cin].view(_DOM, _DOM, n * cin)
    t1 = ws.get("t1", (36 * n_max * cin,))[: 36 * n * cin]
    if s_c == 1 and s_w == cin and s_h == wp * cin:
        # row pass of Bᵀ d B straight on the (overlapping) image rows 4t .. 4t+5, per image: one bmm
        wpc = s_h
        r = ws.get("r", (bsz * rows * _DOM * wpc,))[: bsz * nt * _DOM * wpc].view(bsz, nt, _DOM, wpc)
        for b in range(bsz):
            rows_b = xp.as_strided((nt, _DOM, wpc), (_TILE * s_h, s_h, 1), base + b * s_b + t0 * _TILE * s_h)
            torch.bmm(_BT.expand(nt, _DOM, _DOM), rows_b, out=r[b])
        # gather the overlapping 6-wide column windows: (i, b, B, nt, tw, Cin), channels contiguous
        src = r.as_strided(
            (_DOM, _DOM, bsz, nt, tw, cin), (wpc, cin, nt * _DOM * wpc, _DOM * wpc, _TILE * cin, 1), r.storage_offset()
        )
        t1.view(_DOM, _DOM, bsz, nt, tw, cin).copy_(src)
    else:
        # gather the overlapping 6x6 tiles: (6, 6, B, nt, tw, Cin), then the row pass (one matmul)
        src = xp.as_strided(
            (_DOM, _DOM, bsz, nt, tw, cin), (s_h, s_w, s_b, _TILE * s_h, _TILE * s_w, s_c), base + t0 * _TILE * s_h
        )
        d = ws.get("d", (36 * n_max * cin,))[: 36 * n * cin].view(_DOM, _DOM, bsz, nt, tw, cin)
        d.copy_(src)
        torch.mm(_BT, d.view(_DOM, _DOM * n * cin), out=t1.view(_DOM, _DOM * n * cin))
    # column pass: 6 matmuls, batched
    torch.bmm(_BT_BATCH, t1.view(_DOM, _DOM, n * cin), out=v)
    # 36 products (n, Cin) @ (Cin, Cout)
    m = ws.get("m", (36 * n_max * cout,))[: 36 * n * cout].view(36, n, cout)
    torch.bmm(v.view(36, n, cin), u, out=m)
    if bias is not None:
        m[_BIAS_POS].add_(bias)
    # output transform Aᵀ m A for the 16 outputs of every tile
    y = ws.get("y", (16 * n_max * cout,))[: 16 * n * cout].view(16, n * cout)
    if cout <= 128:  # two passes (rows, then columns): fewer flops, faster when the planes are small
        z = ws.get("z", (24 * n_max * cout,))[: 24 * n * cout].view(4, 6 * n * cout)
        torch.mm(_AT, m.view(6, 6 * n * cout), out=z)
        torch.bmm(_AT_BATCH, z.view(4, 6, n * cout), out=y.view(4, 4, n * cout))
    else:  # one matmul with Aᵀ⊗Aᵀ
        torch.mm(_KA, m.view(36, n * cout), out=y)
    if pool:  # 2x2 max-pool inside each 4x4 output tile (ReLU and the bias commute with it)
        y6 = y.view(2, 2, 2, 2, n * cout)  # (row pair, row in pair, col pair, col in pair)
        p1 = ws.get("p1", (8 * n_max * cout,))[: 8 * n * cout].view(2, 2, 2, n * cout)
        torch.maximum(y6[:, 0], y6[:, 1], out=p1)
        p2 = ws.get("p2", (4 * n_max * cout,))[: 4 * n * cout].view(2, 2, n * cout)
        torch.maximum(p1[:, :, 0], p1[:, :, 1], out=p2)
        y = p2
    out = dst.as_strided(
        (f, f, bsz, nt, tw, cout), (d_h, d_w, d_b, f * d_h, f * d_w, d_c), dst.storage_offset() + t0 * f * d_h
    )
    y = y.view(f, f, bsz, nt, tw, cout)
    if relu:
        torch.clamp_min(y, 0.0, out=out)
    else:
        out.copy_(y)


def _im2col_layer(
    xp: torch.Tensor,
    h: int,
    w: int,
    wmat: torch.Tensor,
    bias: torch.Tensor | None,
    relu: bool,
    dst: torch.Tensor,
    ws: _Workspace,
    strip_pixels: int = 16384,
    workers: _StripPool | None = None,
) -> None:
    """3x3 convolution as an im2col matmul, for layers with few input channels (the RGB layer).

    ``xp``: NHWC buffer with the image at (1, 1) and zeros around; ``wmat``: (9*Cin, Cout) with rows ordered
    (ky, kx, cin); writes the (h, w) output at ``dst[:, 0, 0]``.
    """
    bsz = xp.shape[0]
    rows = max(1, min(h, strip_pixels // max(1, bsz * w)))
    strips = [(r0, min(rows, h - r0)) for r0 in range(0, h, rows)]

    def one(strip, wsp):
        _im2col_strip(xp, w, wmat, bias, relu, dst, wsp, strip[0], strip[1], rows)

    if workers is None or workers.workers <= 1 or len(strips) == 1:
        for strip in strips:
            one(strip, ws)
    else:
        workers.run(one, strips)


def _im2col_strip(xp, w, wmat, bias, relu, dst, ws, r0: int, nr: int, rows: int) -> None:
    bsz, _, _, cin = xp.shape
    cout = wmat.shape[1]
    s_b, s_h, s_w, s_c = xp.stride()
    k = 9 * cin
    npx = bsz * nr * w
    src = xp.as_strided((bsz, nr, w, 3, 3, cin), (s_b, s_h, s_w, s_h, s_w, s_c), xp.storage_offset() + r0 * s_h)
    cols = ws.get("cols", (bsz * rows * w * k,))[: npx * k].view(bsz, nr, w, 3, 3, cin)
    cols.copy_(src)
    o = ws.get("o1", (bsz * rows * w * cout,))[: npx * cout].view(npx, cout)
    if bias is not None:
        torch.addmm(bias, cols.view(npx, k), wmat, out=o)
    else:
        torch.mm(cols.view(npx, k), wmat, out=o)
    out = dst[:, r0 : r0 + nr, :w]
    o = o.view(bsz, nr, w, cout)
    if relu:
        torch.clamp_min(o, 0.0, out=out)
    else:
        out.copy_(o)


def winograd_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    relu: bool = False,
    pool: bool = False,
    *,
    strip_tiles: int | None = None,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` by Winograd F(4x4, 3x3), optionally + ReLU + 2x2 max-pool.

    ``x``: (B, Cin, H, W) float32; ``weight``: (Cout, Cin, 3, 3). Returns (B, Cout, H, W) (or the pooled size,
    floor division as in ``F.max_pool2d(., 2)``), NCHW-contiguous float32.
    """
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3) or x.shape[1] != weight.shape[1]:
        raise ValueError(f"winograd_conv2d: bad shapes x={tuple(x.shape)} weight={tuple(weight.shape)}")
    x = x.detach().float()
    bsz, cin, h, w = x.shape
    cout = weight.shape[0]
    ws = _Workspace()
    th, tw = _tiles(h), _tiles(w)
    xp = x.new_zeros(bsz, _TILE * th + 2, _TILE * tw + 2, cin)
    xp[:, 1 : 1 + h, 1 : 1 + w].copy_(x.permute(0, 2, 3, 1))
    f = 2 if pool else _TILE
    out = x.new_empty(bsz, f * th, f * tw, cout)
    b = None if bias is None else bias.detach().float().contiguous()
    with torch.no_grad():
        _wino_layer(xp, h, w, transform_weight(weight), b, relu, pool, out, ws, strip_tiles)
    ho, wo = (h // 2, w // 2) if pool else (h, w)
    return out[:, :ho, :wo].permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------------------
# A chain of layers
# --------------------------------------------------------------------------------------------------------
@dataclass
class _Conv:
    name: str
    weight: torch.Tensor  # (Cout, Cin, 3, 3) float32, kept for the exact fallback
    bias: torch.Tensor | None
    u: torch.Tensor | None  # Winograd weights (36, Cin, Cout), None for the im2col layer
    wmat: torch.Tensor | None  # im2col weights (9*Cin, Cout)
    relu: bool = False
    relu_name: str | None = None
    pool: bool = False  # a 2x2 max-pool follows (after the ReLU)
    pool_name: str | None = None


class WinogradVGGTrunk(nn.Module):
    """Runs a chain of ``conv3x3(pad 1) [-> ReLU] [-> maxpool 2x2]`` layers with Winograd convolution.

    ``layers``: an ordered iterable of ``(name, module)`` pairs made of ``nn.Conv2d`` (3x3, stride 1, padding 1,
    no dilation/groups), ``nn.ReLU`` and ``nn.MaxPool2d`` (kernel 2, stride 2) -- e.g. ``vgg.features.named_
    children()``. ``forward(x, layers=None)`` takes a (B, 3, H, W) preprocessed batch and returns a dict
    ``{name: (B, C, h, w) float32 tensor}`` for the requested layer names (default: the last convolution). The name
    of a convolution gives its output *after* its ReLU when a ReLU follows directly (the usual "conv5_3"
    meaning); the ReLU's own name gives the same tensor; a pool's name gives the pooled map.

    Intermediate buffers are reused across calls (about 1.25 x B x H x W x 64 x 4 bytes); :meth:`release`
    frees them. Calls are serialised by a lock.
    """

    def __init__(
        self, layers: Iterable[tuple[str, nn.Module]], first_layer_im2col: bool = True, parallel: str = "strips"
    ) -> None:
        super().__init__()
        if parallel not in ("strips", "omp"):
            raise ValueError(f"parallel must be 'strips' or 'omp', got {parallel!r}")
        self.parallel = parallel
        self.convs: list[_Conv] = []
        for name, mod in layers:
            if isinstance(mod, nn.Conv2d):
                if (
                    tuple(mod.kernel_size) != (3, 3)
                    or tuple(mod.stride) != (1, 1)
                    or tuple(mod.padding) != (1, 1)
                    or tuple(mod.dilation) != (1, 1)
                    or mod.groups != 1
                    or getattr(mod, "padding_mode", "zeros") != "zeros"
                ):
                    raise ValueError(f"WinogradVGGTrunk: layer {name!r} is not a 3x3/stride 1/padding 1 convolution")
                w = mod.weight.detach().float().contiguous()
                b = None if mod.bias is None else mod.bias.detach().float().contiguous()
                first = not self.convs and first_layer_im2col and w.shape[1] <= 8
                self.convs.append(
                    _Conv(
                        name=name,
                        weight=w,
                        bias=b,
                        u=None if first else transform_weight(w),
                        wmat=w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]).contiguous() if first else None,
                    )
                )
            elif isinstance(mod, nn.ReLU):
                if not self.convs or self.convs[-1].relu or self.convs[-1].pool:
                    raise ValueError(f"WinogradVGGTrunk: ReLU {name!r} must follow a convolution")
                self.convs[-1].relu = True
                self.convs[-1].relu_name = name
            elif isinstance(mod, nn.MaxPool2d):
                k, s = mod.kernel_size, mod.stride
                k = (k, k) if isinstance(k, int) else tuple(k)
                s = (s, s) if isinstance(s, int) else tuple(s)
                p = mod.padding if isinstance(mod.padding, int) else max(mod.padding)
                if k != (2, 2) or s != (2, 2) or p != 0 or mod.ceil_mode or mod.dilation not in (1, (1, 1)):
                    raise ValueError(f"WinogradVGGTrunk: pool {name!r} must be a 2x2/stride 2 max-pool")
                if not self.convs or self.convs[-1].pool:
                    raise ValueError(f"WinogradVGGTrunk: pool {name!r} must follow a convolution")
                self.convs[-1].pool = True
                self.convs[-1].pool_name = name
            else:
                raise ValueError(f"WinogradVGGTrunk: unsupported layer {name!r} ({type(mod).__name__})")
        if not self.convs:
            raise ValueError("WinogradVGGTrunk: no convolution")
        self.in_channels = self.convs[0].weight.shape[1]
        self._ws = _Workspace()
        self._pool: _StripPool | None = None
        self._lock = threading.Lock()
        self.reuse_buffers = True

    # names ---------------------------------------------------------------------------------------------
    @property
    def default_layer(self) -> str:
        """The last convolution (its output after its ReLU, when it has one)."""
        return self.convs[-1].name

    @property
    def layer_names(self) -> list[str]:
        out = []
        for c in self.convs:
            out.append(c.name)
            if c.relu_name:
                out.append(c.relu_name)
            if c.pool_name:
                out.append(c.pool_name)
        return out

    def _resolve(self, name: str) -> tuple[int, bool]:
        """(index of the conv, pooled?) for a layer name."""
        for i, c in enumerate(self.convs):
            if name in (c.name, c.relu_name):
                return i, False
            if name == c.pool_name:
                return i, True
        raise KeyError(f"unknown layer {name!r}; known: {', '.join(self.layer_names)}")

    def release(self) -> None:
        """Free the reused buffers and stop the worker threads (both come back on the next call)."""
        with self._lock:
            self._ws.clear()
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def workspace_bytes(self) -> int:
        """Bytes held by the reused buffers."""
        return self._ws.nbytes() + (self._pool.nbytes() if self._pool is not None else 0)

    def _workers(self, n: int) -> _StripPool | None:
        if self.parallel != "strips" or n <= 1:
            return None
        if self._pool is None or self._pool.workers != n:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = _StripPool(n)
            weakref.finalize(self, self._pool.shutdown)
        return self._pool

    # forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, layers: Sequence[str] | str | None = None) -> dict[str, torch.Tensor]:
        if isinstance(layers, str):
            layers = [layers]
        if layers is None:
            layers = [self.default_layer]
        want = {name: self._resolve(name) for name in layers}
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"WinogradVGGTrunk: expected a (B, {self.in_channels}, H, W) batch, got {tuple(x.shape)}")
        if x.device.type != "cpu":
            raise ValueError("WinogradVGGTrunk runs on the CPU only")
        outside = not torch.is_inference_mode_enabled()
        with self._lock:
            threads = torch.get_num_threads()
            workers = self._workers(threads)
            try:
                if workers is not None:
                    # the workers do the heavy lifting; the few big copies left here run on one thread, as a
                    # barrier-synchronised op is very slow when another process holds the other core
                    torch.set_num_threads(1)
                # the reused buffers are inference tensors: they are only ever touched in inference mode
                with torch.inference_mode():
                    out = self._run(x.detach().float(), want, workers)
            finally:
                if workers is not None:
                    torch.set_num_threads(threads)
                if not self.reuse_buffers:
                    self._ws.clear()
                    if self._pool is not None:
                        self._pool.clear()
        if outside:  # hand back ordinary tensors to a caller outside inference mode
            out = {name: t.clone() for name, t in out.items()}
        return out

    def _run(
        self, x: torch.Tensor, want: dict[str, tuple[int, bool]], workers: _StripPool | None
    ) -> dict[str, torch.Tensor]:
        ws = self._ws
        bsz, cin, h, w = x.shape
        stop = max(i for i, _ in want.values())
        # per conv: do we need its unpooled output (then the pool is not fused)?
        need_unpooled = {i for i, pooled in want.values() if not pooled}
        results: dict[tuple[int, bool], torch.Tensor] = {}

        def buffer_for(idx: int, hh: int, ww: int, c: int, grid_rows: int, grid_cols: int) -> torch.Tensor:
            rows, cols = _buffer_size(hh, ww, grid_rows, grid_cols)
            return _padded(ws, "act%d" % (idx % 2), bsz, hh, ww, c, rows, cols)

        # the input, NHWC with a zero border
        first = self.convs[0]
        if first.u is None:
            xp = ws.get("input", (bsz, h + 2, w + 2, cin))
            for border in (xp[:, 0], xp[:, -1], xp[:, :, 0], xp[:, :, -1]):
                border.zero_()
        else:
            rows, cols = _buffer_size(h, w, 0, 0)
            xp = _padded(ws, "input", bsz, h, w, cin, rows, cols)
            xp[:, 1 + h :].zero_()
            xp[:, :, 1 + w :].zero_()
        xp[:, 1 : 1 + h, 1 : 1 + w].copy_(x.permute(0, 2, 3, 1))

        slot = 0
        for i, conv in enumerate(self.convs[: stop + 1]):
            cout = conv.weight.shape[0]
            fuse_pool = conv.pool and i not in need_unpooled
            ho, wo = (h // 2, w // 2) if fuse_pool else (h, w)
            last = i == stop
            if conv.u is None:
                grid_r, grid_c = h, w
            else:
                f = 2 if fuse_pool else _TILE
                grid_r, grid_c = f * _tiles(h), f * _tiles(w)
            if last and not (conv.pool and not fuse_pool):
                # the final output: a fresh tensor (never a view of reused buffers)
                out = torch.empty(bsz, grid_r, grid_c, cout)
                dst = out
            else:
                out = buffer_for(slot, ho, wo, cout, grid_r, grid_c)
                slot += 1
                dst = out[:, 1:, 1:]
            if conv.u is None:
                _im2col_layer(xp, h, w, conv.wmat, conv.bias, conv.relu, dst, ws, workers=workers)
            else:
                _wino_layer(xp, h, w, conv.u, conv.bias, conv.relu, fuse_pool, dst, ws, workers=workers)
            if dst is out:
                fmap = out[:, :ho, :wo]
            else:
                _zero_outside(out, ho, wo)
                fmap = out[:, 1 : 1 + ho, 1 : 1 + wo]
            if (i, False) in want.values() or (fuse_pool and (i, True) in want.values()):
                key = (i, fuse_pool)
                results[key] = fmap.permute(0, 3, 1, 2).contiguous()
            if conv.pool and not fuse_pool:
                # unfused pool (its input was asked for): pool the NHWC map
                hp, wp = h // 2, w // 2
                pooled_nchw = F.max_pool2d(fmap.permute(0, 3, 1, 2), 2)
                if (i, True) in want.values():
                    results[(i, True)] = pooled_nchw.contiguous()
                if not last:
                    nb = buffer_for(slot, hp, wp, cout, 0, 0)
                    slot += 1
                    nb[:, 1 : 1 + hp, 1 : 1 + wp].copy_(pooled_nchw.permute(0, 2, 3, 1))
                    _zero_outside(nb, hp, wp)
                    out = nb
                ho, wo = hp, wp
            xp = out
            h, w = ho, wo
        return {name: results[key] for name, key in want.items()}


# --------------------------------------------------------------------------------------------------------
# Integration with instance_search.backbones
# --------------------------------------------------------------------------------------------------------
def _vgg_layers(model) -> list[tuple[str, nn.Module]]:
    """The ordered (name, module) layers of a VGG trunk: a Backbone, a VGG16 module or an nn.Sequential."""
    net = getattr(model, "net", model)  # Backbone -> its exact network
    features = getattr(net, "features", net)
    if not isinstance(features, nn.Sequential):
        raise TypeError(
            f"winograd engine: expected a VGG backbone (with an nn.Sequential 'features'), got {type(model).__name__}"
        )
    return list(features.named_children())


def winograd_trunk(backbone) -> WinogradVGGTrunk:
    """A Winograd engine with the same contract as ``backbone.trunk``: ``engine(x, layers) -> {layer: map}``.

    ``backbone``: a VGG16 :class:`~instance_search.backbones.Backbone` (or its ``net``, or any ``nn.Sequential``
    of 3x3 convs / ReLUs / 2x2 max-pools). The weights are copied (transformed) when it is built: rebuild it
    after changing them. CPU only.
    """
    name = getattr(backbone, "name", None)
    if name is not None and isinstance(name, str) and name != "vgg16":
        raise ValueError(f"the winograd engine supports VGG16 only, not {name!r}")
    device = getattr(backbone, "device", torch.device("cpu"))
    if torch.device(device).type != "cpu":
        raise ValueError(f"the winograd engine runs on the CPU only (backbone on {device})")
    return WinogradVGGTrunk(_vgg_layers(backbone))


# --------------------------------------------------------------------------------------------------------
# ResNet-50 with BatchNorm folded into its convolutions
# --------------------------------------------------------------------------------------------------------
class _Folded(nn.Module):
    """One convolution with its BatchNorm folded in (buffers, not parameters: inference only)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype, channels_last: bool):
        super().__init__()
        w, b = fold_batchnorm(conv, bn, dtype)
        if channels_last:
            w = w.contiguous(memory_format=torch.channels_last)
        self.register_buffer("weight", w)
        self.register_buffer("bias", b)
        self.stride, self.padding = conv.stride, conv.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


@dataclass
class _FastBlock:
    """One bottleneck of :class:`FoldedResNet50` in its Winograd form: the 1x1 convolutions as ``(Cin, Cout)``
    matrices for NHWC matmuls, the 3x3 one as Winograd weights (stride 1) or a folded conv (stride 2)."""

    w1: torch.Tensor  # (Cin, width)
    b1: torch.Tensor
    s1: int  # stride of conv1 (2 in the down-sampling block of the Caffe variant)
    u2: torch.Tensor | None  # (36, width, width) Winograd weights, None when conv2 has stride 2
    c2: nn.Module  # the folded conv2 (used when u2 is None)
    b2: torch.Tensor
    w3: torch.Tensor  # (width, Cout)
    b3: torch.Tensor
    wd: torch.Tensor | None  # (Cin, Cout) projection shortcut
    bd3: torch.Tensor | None  # its bias + conv3's bias (added once)
    sd: int


def _as_matrix(folded: "_Folded") -> torch.Tensor:
    w = folded.weight
    if tuple(w.shape[2:]) != (1, 1):
        raise ValueError(f"expected a 1x1 convolution, got a {tuple(w.shape)} weight")
    return w.reshape(w.shape[0], w.shape[1]).t().contiguous()


class FoldedResNet50(nn.Module):
    """ResNet-50 (:class:`~instance_search.backbones.resnet50.ResNet50`, either variant) for inference with
    every BatchNorm folded into the convolution before it (:func:`fold_batchnorm`: one conv + bias instead of
    conv + BN), activations in the channels-last layout (oneDNN's fast path on CPU) and in-place ReLUs. Same
    contract as the network: ``forward(x, layers) -> {tap: (B, C, h, w)}`` (taps returned contiguous NCHW).
    ``dtype=torch.float64`` gives the float64 reference of the folded arithmetic. The weights are copied when it
    is built: rebuild after changing them.

    ``winograd=True`` (float32, channels-last; the ``winograd`` engine): the bottlenecks run on NHWC tensors;
    every 3x3 stride-1 convolution (all of them in the Caffe variant, 13 of 16 in torchvision's) goes through the
    Winograd F(4x4, 3x3) layer of the VGG engine (:func:`_wino_layer`: strips, ReLU fused into the output
    scatter), reading a zero-bordered buffer that the preceding 1x1 convolution writes straight into (its ReLU
    fused into that copy); the 1x1 convolutions are plain ``(pixels, Cin) @ (Cin, Cout)`` matmuls, the residual
    added in place through ``addmm_`` (the shortcut is the accumulator), the buffers reused across calls.
    Deep layers with few tiles split their output channels between the worker threads instead of their tiles
    (every worker would otherwise stream all the Winograd weights)."""

    def __init__(self, net, dtype: torch.dtype = torch.float32, channels_last: bool = True, winograd: bool = False):
        super().__init__()
        from .resnet50 import RESNET50_LAYERS

        if winograd and (dtype != torch.float32 or not channels_last):
            raise ValueError("FoldedResNet50: winograd=True needs dtype=torch.float32 and channels_last=True")
        self.layer_names = RESNET50_LAYERS
        self.dtype, self.channels_last, self.winograd = dtype, channels_last, bool(winograd)
        self.stem = _Folded(net.conv1, net.bn1, dtype, channels_last)
        self.stages = nn.ModuleList()
        for i in range(4):
            blocks = nn.ModuleList()
            for blk in getattr(net, f"layer{i + 1}"):
                m = nn.Module()
                m.c1 = _Folded(blk.conv1, blk.bn1, dtype, channels_last)
                m.c2 = _Folded(blk.conv2, blk.bn2, dtype, channels_last)
                m.c3 = _Folded(blk.conv3, blk.bn3, dtype, channels_last)
                m.down = None if blk.downsample is None else _Folded(blk.downsample[0], blk.downsample[1], dtype,
                                                                      channels_last)
                blocks.append(m)
            self.stages.append(blocks)
        self._fast: list[list[_FastBlock]] = []
        if self.winograd:
            for blocks in self.stages:
                row = []
                for m in blocks:
                    w2 = m.c2.weight
                    stride1 = tuple(m.c2.stride) == (1, 1) and tuple(m.c2.padding) == (1, 1)
                    row.append(_FastBlock(
                        w1=_as_matrix(m.c1), b1=m.c1.bias.contiguous(), s1=int(m.c1.stride[0]),
                        u2=transform_weight(w2) if stride1 else None, c2=m.c2, b2=m.c2.bias.contiguous(),
                        w3=_as_matrix(m.c3), b3=m.c3.bias.contiguous(),
                        wd=None if m.down is None else _as_matrix(m.down),
                        bd3=None if m.down is None else (m.down.bias + m.c3.bias).contiguous(),
                        sd=1 if m.down is None else int(m.down.stride[0])))
                self._fast.append(row)
        self._ws = _Workspace()
        self._pool: _StripPool | None = None
        self._lock = threading.Lock()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, layers: Sequence[str] | str | None = None) -> dict[str, torch.Tensor]:
        from .taps import requested_taps

        layers, deepest = requested_taps("resnet50", layers, self.layer_names, "res5")
        if self.winograd:
            if x.device.type != "cpu":
                raise ValueError("the winograd ResNet-50 engine runs on the CPU only")
            with self._lock, torch.inference_mode():
                out = self._forward_winograd(x, layers, deepest)
            if not torch.is_inference_mode_enabled():
                out = {k: v.clone() for k, v in out.items()}
            return out
        out: dict[str, torch.Tensor] = {}
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu_(self.stem(x))
        if "conv1" in layers:
            out["conv1"] = x.contiguous()
        if deepest == 0:
            return out
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        for i, blocks in enumerate(self.stages):
            for m in blocks:
                y = F.relu_(m.c1(x))
                y = F.relu_(m.c2(y))
                y = m.c3(y)
                y += x if m.down is None else m.down(x)
                x = F.relu_(y)
            name = self.layer_names[i + 1]
            if name in layers:
                out[name] = x.contiguous()
            if i + 1 == deepest:
                break
        return out

    # the Winograd path ---------------------------------------------------------------------------------------
    def release(self) -> None:
        """Free the reused buffers and stop the worker threads (both come back on the next call)."""
        with self._lock:
            self._ws.clear()
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def workspace_bytes(self) -> int:
        return self._ws.nbytes() + (self._pool.nbytes() if self._pool is not None else 0)

    def _workers(self) -> _StripPool | None:
        n = torch.get_num_threads()
        if n <= 1:
            return None
        if self._pool is None or self._pool.workers != n:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = _StripPool(n)
            weakref.finalize(self, self._pool.shutdown)
        return self._pool

    def _forward_winograd(self, x: torch.Tensor, layers: list[str], deepest: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        x = x.detach().float().contiguous(memory_format=torch.channels_last)
        x = F.relu_(self.stem(x))
        if "conv1" in layers:
            out["conv1"] = x.contiguous()
        if deepest == 0:
            return out
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        a = x.permute(0, 2, 3, 1)  # NHWC
        if not a.is_contiguous():
            a = a.contiguous()
        workers = self._workers()
        slot = 0
        for i, blocks in enumerate(self._fast):
            for blk in blocks:
                a = self._block(a, blk, workers, "res%d" % (slot % 2))
                slot += 1
            name = self.layer_names[i + 1]
            if name in layers:
                out[name] = a.permute(0, 3, 1, 2).contiguous()
            if i + 1 == deepest:
                break
        return out

    def _block(self, a: torch.Tensor, blk: _FastBlock, workers: _StripPool | None, out_name: str) -> torch.Tensor:
        """One bottleneck on the NHWC tensor ``a``; returns its NHWC output (a workspace buffer ``out_name``)."""
        ws = self._ws
        bsz, hh, ww, cin = a.shape
        width, cout = blk.w1.shape[1], blk.w3.shape[1]
        xs = a if blk.s1 == 1 else a[:, :: blk.s1, :: blk.s1].contiguous()
        h, w = xs.shape[1:3]
        y1 = ws.get("y1", (bsz * h * w, width))
        torch.addmm(blk.b1, xs.view(-1, cin), blk.w1, out=y1)
        if blk.u2 is not None:
            rows, cols = _buffer_size(h, w, 0, 0)
            xp = _padded(ws, "pad", bsz, h, w, width, rows, cols)
            _zero_outside(xp, h, w)
            torch.clamp_min(y1.view(bsz, h, w, width), 0.0, out=xp[:, 1 : 1 + h, 1 : 1 + w])
            th, tw = _tiles(h), _tiles(w)
            grid = ws.get("grid", (bsz, _TILE * th, _TILE * tw, width))
            self._conv3x3(xp, h, w, blk, grid, workers)
            h2, w2 = h, w
            if (h2, w2) == (_TILE * th, _TILE * tw):
                y2 = grid.view(-1, width)
            else:
                y2 = ws.get("y2", (bsz, h2, w2, width))
                y2.copy_(grid[:, :h2, :w2])
                y2 = y2.view(-1, width)
        else:  # a stride-2 3x3 (torchvision's variant): the folded direct convolution, channels-last
            y1.clamp_min_(0.0)
            y2n = F.relu_(blk.c2(y1.view(bsz, h, w, width).permute(0, 3, 1, 2)))
            h2, w2 = y2n.shape[-2:]
            y2 = y2n.permute(0, 2, 3, 1).contiguous().view(-1, width)
        res = ws.get(out_name, (bsz, h2, w2, cout))
        flat = res.view(-1, cout)
        if blk.wd is not None:
            xd = a if blk.sd == 1 else (xs if blk.sd == blk.s1 else a[:, :: blk.sd, :: blk.sd].contiguous())
            torch.addmm(blk.bd3, xd.reshape(-1, cin), blk.wd, out=flat)
        else:
            torch.add(a.view(-1, cin), blk.b3, out=flat)
        flat.addmm_(y2, blk.w3)
        flat.clamp_min_(0.0)
        return res

    def _conv3x3(self, xp, h, w, blk: _FastBlock, grid, workers: _StripPool | None) -> None:
        ws = self._ws
        bsz = xp.shape[0]
        cout = blk.u2.shape[2]
        tiles = bsz * _tiles(h) * _tiles(w)
        n = 0 if workers is None else workers.workers
        if n > 1 and tiles < 16 * n * 4 and cout >= 64 * n:
            # few tiles: one strip per worker, each on its share of the output channels
            step = -(-cout // n)
            parts = [(c0, min(cout, c0 + step)) for c0 in range(0, cout, step)]

            def one(part, wsp):
                c0, c1 = part
                _wino_layer(xp, h, w, blk.u2[:, :, c0:c1], blk.b2[c0:c1], True, False, grid[..., c0:c1], wsp,
                            strip_tiles=tiles)

            workers.run(one, parts)
        else:
            _wino_layer(xp, h, w, blk.u2, blk.b2, True, False, grid, ws, workers=workers)


def use_engine(backbone, engine: str = "auto"):
    """Make ``backbone.features`` run on ``engine`` and return the backbone.

    ``'auto'`` (the default): the fastest engine that agrees with the exact network for this backbone and
    device, as decided by :func:`resolve_engine` (``winograd`` for VGG16 and ResNet-50 on the CPU, ``folded``
    for EfficientNet-Lite0 on the CPU, else ``exact``); ``'winograd'``: VGG16 with Winograd F(4x4, 3x3)
    (:class:`WinogradVGGTrunk`), or ResNet-50 with BatchNorm folded and Winograd for its 3x3 stride-1
    convolutions (:class:`FoldedResNet50`, ``winograd=True``); ``'folded'``: ResNet-50 with BatchNorm folded into
    its convolutions, channels-last, direct convolutions, or EfficientNet-Lite0 with BatchNorm folded, NHWC
    activations and its 1x1 convolutions as matmuls (:class:`~instance_search.backbones.fast_lite.FoldedLite0`);
    ``'exact'``: the original fp32 network. A fast engine is built once and kept on the backbone
    (``backbone.__dict__['_<engine>_engine']``), so switching back and forth is free. :func:`engine_of` tells
    which one runs.
    """
    name = getattr(backbone, "name", None)
    device = getattr(backbone, "device", torch.device("cpu"))
    engine = resolve_engine(name if isinstance(name, str) else None, device, engine)
    if engine == "exact":
        backbone.trunk = None
        return backbone
    key = f"_{engine}_engine"
    cached = backbone.__dict__.get(key)
    if cached is None:
        if engine == "winograd" and name != "resnet50":
            cached = winograd_trunk(backbone)
        elif name == "efficientnet-lite0":
            cached = FoldedLite0(backbone.net)
        else:
            cached = FoldedResNet50(backbone.net, winograd=engine == "winograd")
        backbone.__dict__[key] = cached
    backbone.trunk = cached
    return backbone


def engine_of(backbone) -> str:
    """The engine that runs ``backbone.trunk``: ``'winograd'`` (:class:`WinogradVGGTrunk`, or
    :class:`FoldedResNet50` with Winograd), ``'folded'`` (:class:`FoldedResNet50` without, or
    :class:`~instance_search.backbones.fast_lite.FoldedLite0`), else ``'exact'``."""
    trunk = getattr(backbone, "trunk", None)
    if isinstance(trunk, WinogradVGGTrunk):
        return "winograd"
    if isinstance(trunk, FoldedLite0):
        return "folded"
    if isinstance(trunk, FoldedResNet50):
        return "winograd" if trunk.winograd else "folded"
    return "exact"
