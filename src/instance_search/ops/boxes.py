"""Box maths for region proposals and detection (Ren, He, Girshick & Sun 2015, "Faster R-CNN", NIPS; Girshick
2015, "Fast R-CNN", ICCV): IoU, the box coding of Ren Eq. 2, clipping, NMS, anchors and their training labels,
the projection of pixel boxes onto conv-map cells, and RoI max-pooling. Pure functions of tensors / arrays.

* Coordinates: boxes are ``(x1, y1, x2, y2)`` float pixels of the *map frame*, i.e. the image whose size is
  ``(W * stride, H * stride)`` for an ``H x W`` conv map (stride 16 for VGG16 conv5_3): cell ``(i, j)`` covers
  pixels ``[j*s, (j+1)*s) x [i*s, (i+1)*s)``. Widths are ``x2 - x1`` (continuous, no ``+1``).
  :func:`to_map_frame` / :func:`from_map_frame` convert from / to original-image pixels by proportional scaling.
* Cells: ``(x, y, w, h)`` integer windows of the map (as :func:`~instance_search.ops.pooling.rmac_regions`
  gives them); :func:`boxes_to_cells` projects pixel boxes onto them as Caffe's RoI pooling does (Girshick 2015,
  Sec. 2.1): edges rounded to cells, inclusive end (:func:`roi_extent`); :func:`roi_pool` is that RoI pooling.
* Anchors (Ren Sec. 3.1.1): ``k = len(sizes) * len(ratios)`` boxes of area ``size^2`` and aspect ``h/w = ratio``
  centred on each cell; order (cell row, cell column, ratio, size).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .integral import window_max
from .pooling import rmac_regions

__all__ = [
    "DEFAULT_SIZES", "DEFAULT_RATIOS", "as_boxes", "to_map_frame", "from_map_frame", "base_anchors", "grid_anchors",
    "box_area", "box_iou", "encode_boxes", "decode_boxes", "clip_boxes", "nms", "assign_anchors", "boxes_to_cells",
    "flip_boxes", "roi_pool", "grid_boxes", "roi_extent", "caffe_round",
]

#: anchor sizes in pixels for images described at a longer side of ~384 px (Ren uses 128/256/512 at ~600-1000)
DEFAULT_SIZES = (48, 96, 192, 384)
DEFAULT_RATIOS = (0.5, 1.0, 2.0)
_DELTA_CLAMP = math.log(1000.0 / 16.0)  # largest exp() argument when decoding w/h (as in Faster R-CNN)


# ------------------------------------------------------------------------------------------------ boxes
def as_boxes(b, name: str = "boxes") -> torch.Tensor:
    """``b`` as a float (N, 4) tensor of ``(x1, y1, x2, y2)`` (one box (4,) becomes (1, 4)); errors name ``name``."""
    t = b if isinstance(b, torch.Tensor) else torch.as_tensor(np.asarray(b, dtype=np.float64))
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if t.ndim == 1 and t.numel() == 4:
        t = t[None]
    if t.ndim != 2 or t.shape[1] != 4:
        raise ValueError(f"{name} must be an (N, 4) array of x1, y1, x2, y2, got shape {tuple(t.shape)}")
    return t


def to_map_frame(boxes, image_wh: tuple[float, float], map_hw: tuple[int, int], stride: int = 16) -> np.ndarray:
    """Original-image pixel boxes -> map-frame pixels (the image of size ``(W*stride, H*stride)``)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx = map_hw[1] * stride / float(image_wh[0])
    sy = map_hw[0] * stride / float(image_wh[1])
    return b * np.array([sx, sy, sx, sy])


def from_map_frame(boxes, image_wh: tuple[float, float], map_hw: tuple[int, int], stride: int = 16) -> np.ndarray:
    """Map-frame pixel boxes -> original-image pixels (inverse of :func:`to_map_frame`)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx = float(image_wh[0]) / (map_hw[1] * stride)
    sy = float(image_wh[1]) / (map_hw[0] * stride)
    return b * np.array([sx, sy, sx, sy])


def base_anchors(sizes: Sequence[float] = DEFAULT_SIZES, ratios: Sequence[float] = DEFAULT_RATIOS) -> torch.Tensor:
    """The ``k`` anchors of one position, centred on (0, 0) (Ren et al. 2015, Sec. 3.1.1): for each ratio
    ``r = h/w`` (outer) and size ``s`` (inner), ``w = s/sqrt(r)``, ``h = s*sqrt(r)``. Shape (k, 4)."""
    if not sizes or not ratios or min(sizes) <= 0 or min(ratios) <= 0:
        raise ValueError(f"anchor sizes and ratios must be non-empty and positive, got {sizes}, {ratios}")
    rows = []
    for r in ratios:
        for s in sizes:
            w, h = s / math.sqrt(r), s * math.sqrt(r)
            rows.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(rows, dtype=torch.float32)


def grid_anchors(height: int, width: int, stride: int, base: torch.Tensor) -> torch.Tensor:
    """All anchors of an ``height x width`` map: ``base`` shifted to every cell centre ``((j+.5)s, (i+.5)s)``.
    Shape (height*width*k, 4), ordered (row, column, anchor) -- the order of :meth:`RPNHead.forward`."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
    return (shifts + base.reshape(1, -1, 4)).reshape(-1, 4)


def box_area(b: torch.Tensor) -> torch.Tensor:
    return (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)


def box_iou(a, b) -> torch.Tensor:
    """Intersection over union of every pair: (N, 4) x (M, 4) -> (N, M) (0 where the union is empty)."""
    a, b = as_boxes(a, "a"), as_boxes(b, "b")
    dt = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dt), b.to(dt)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def encode_boxes(anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Regression targets of ``boxes`` w.r.t. ``anchors`` (Ren et al. 2015, Eq. 2): (N, 4) -> (N, 4)."""
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bx, by = boxes[:, 0] + 0.5 * bw, boxes[:, 1] + 0.5 * bh
    if bool((aw <= 0).any() or (ah <= 0).any() or (bw <= 0).any() or (bh <= 0).any()):
        raise ValueError("encode_boxes: anchors and boxes must have positive width and height")
    return torch.stack([(bx - ax) / aw, (by - ay) / ah, torch.log(bw / aw), torch.log(bh / ah)], dim=1)


def decode_boxes(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_boxes` (w/h deltas clamped at log(1000/16) as in Faster R-CNN): (N, 4)."""
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    dx, dy = deltas[:, 0], deltas[:, 1]
    dw, dh = deltas[:, 2].clamp(max=_DELTA_CLAMP), deltas[:, 3].clamp(max=_DELTA_CLAMP)
    cx, cy = dx * aw + ax, dy * ah + ay
    w, h = torch.exp(dw) * aw, torch.exp(dh) * ah
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)


def clip_boxes(boxes: torch.Tensor, image_wh: tuple[float, float]) -> torch.Tensor:
    """Clip boxes to ``[0, w] x [0, h]``."""
    w, h = float(image_wh[0]), float(image_wh[1])
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                        boxes[:, 3].clamp(0, h)], dim=1)


def nms(boxes, scores, iou_threshold: float = 0.7, max_keep: int | None = None) -> torch.Tensor:
    """Greedy non-maximum suppression (Ren et al. 2015, Sec. 3.3): repeatedly keep the best remaining box and
    drop the others whose IoU with it is > ``iou_threshold``. Returns kept indices, best first (at most
    ``max_keep``). Ties in score: the lower index first."""
    b = as_boxes(boxes).detach()
    s = torch.as_tensor(scores).detach().reshape(-1)
    if s.shape[0] != b.shape[0]:
        raise ValueError(f"nms: {b.shape[0]} boxes but {s.shape[0]} scores")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"nms: iou_threshold must be in [0, 1], got {iou_threshold}")
    n = b.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = np.lexsort((np.arange(n), -s.double().numpy())).astype(np.int64)
    bb = b.double().numpy()[order]
    x1, y1, x2, y2 = bb[:, 0], bb[:, 1], bb[:, 2], bb[:, 3]
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    suppressed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    limit = n if max_keep is None else int(max_keep)
    for i in range(n):  # IoU of the kept box with the boxes after it only: O(n) per kept box
        if suppressed[i]:
            continue
        keep.append(i)
        if len(keep) >= limit:
            break
        iw = np.clip(np.minimum(x2[i], x2[i + 1:]) - np.maximum(x1[i], x1[i + 1:]), 0, None)
        ih = np.clip(np.minimum(y2[i], y2[i + 1:]) - np.maximum(y1[i], y1[i + 1:]), 0, None)
        inter = iw * ih
        union = area[i] + area[i + 1:] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        suppressed[i + 1:] |= iou > iou_threshold
    return torch.from_numpy(order[np.asarray(keep, dtype=np.int64)])



# ------------------------------------------------------------------------------------------------ anchor labels
def assign_anchors(anchors: torch.Tensor, gt: torch.Tensor, pos_iou: float = 0.7,
                   neg_iou: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor labels (Ren et al. 2015, Sec. 3.1.2): 1 = positive (IoU >= ``pos_iou`` with some ground-truth box,
    or the highest-IoU anchor(s) of a ground-truth box), 0 = negative (IoU < ``neg_iou`` with all), -1 = ignored.
    Returns (labels (N,) int64, index of the best ground-truth box per anchor (N,))."""
    n = anchors.shape[0]
    if gt.shape[0] == 0:
        return torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    iou = box_iou(anchors, gt)  # (N, G)
    best, arg = iou.max(dim=1)
    labels = torch.full((n,), -1, dtype=torch.int64)
    labels[best < neg_iou] = 0
    labels[best >= pos_iou] = 1
    gt_best = iou.max(dim=0).values  # (G,)
    for g in range(gt.shape[0]):
        if gt_best[g] > 0:
            hit = torch.nonzero(iou[:, g] == gt_best[g])[:, 0]
            labels[hit] = 1
            arg[hit] = g
    return labels, arg



def caffe_round(x) -> np.ndarray:
    """C's ``round()`` (halves away from zero), which Caffe's ROIPooling applies; numpy's ``round`` is
    half-to-even and differs at ``.5``."""
    x = np.asarray(x, dtype=np.float64)  # exact for float32 inputs: |x| + 0.5 does not round
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def roi_extent(boxes, stride: int) -> np.ndarray:
    """The cells Caffe's ROIPooling layer gives a box (Girshick 2015, Sec. 2.1; ``roi_pooling_layer.cpp`` of
    caffe-fast-rcnn, as the Faster R-CNN models of Salvador et al. 2016 run it), before clipping: with
    ``spatial_scale = 1/stride`` in float32, ``start = round(x1 * scale)``, ``end = round(x2 * scale)``
    (inclusive) and ``width = max(end - start + 1, 1)`` (likewise rows). Boxes are taken as Caffe takes its
    ``rois`` blob: the coordinates as given, cast to float32. Returns (N, 4) int64 ``(x, y, w, h)``, unclipped."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scale = np.float32(1.0) / np.float32(stride)
    r = caffe_round(b * scale).astype(np.int64)  # the float32 product, as the layer computes it
    w = np.maximum(r[:, 2] - r[:, 0] + 1, 1)
    h = np.maximum(r[:, 3] - r[:, 1] + 1, 1)
    return np.stack([r[:, 0], r[:, 1], w, h], axis=1)


def _clipped_cells(ext: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(cells ``(x, y, w, h)`` of ``ext`` clipped to the map, mask of the boxes left with no cell)."""
    x0 = np.clip(ext[:, 0], 0, width)
    y0 = np.clip(ext[:, 1], 0, height)
    x1 = np.clip(ext[:, 0] + ext[:, 2], 0, width)
    y1 = np.clip(ext[:, 1] + ext[:, 3], 0, height)
    empty = (x1 <= x0) | (y1 <= y0)
    return np.stack([x0, y0, x1 - x0, y1 - y0], axis=1).astype(np.int64), empty


def boxes_to_cells(boxes, stride: int, height: int, width: int) -> np.ndarray:
    """Map-frame pixel boxes ``(x1, y1, x2, y2)`` (e.g. region proposals) -> the feature-map cells ``(x, y, w, h)``
    that RoI pooling reads for them: Caffe's rounding (:func:`roi_extent`: edges rounded to cells, inclusive end,
    at least one cell), clipped to the ``height`` x ``width`` map. The one projection of the package: the region
    MACs of these cells equal :func:`roi_pool` at 1x1. A box whose rounded extent lies wholly outside the map
    (only a box thinner than half a cell on the map's border) has no cell and is refused, naming it."""
    b = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4 or len(b) == 0:
        raise ValueError(f"boxes must be a non-empty (R, 4) array of x1, y1, x2, y2 pixels, got shape {b.shape}")
    if not np.all(np.isfinite(b)) or np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1]):
        bad = b[np.argmax(~np.isfinite(b).all(1) | (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]))]
        raise ValueError(f"box {bad.tolist()} is empty, inverted or not finite (need x1 < x2, y1 < y2)")
    cells, empty = _clipped_cells(roi_extent(b, int(stride)), int(height), int(width))
    if empty.any():
        bad = b[int(np.argmax(empty))]
        raise ValueError(f"box {bad.tolist()} lies outside the {height}x{width} map (stride {stride}) once its edges "
                         f"are rounded to cells")
    return cells


def flip_boxes(boxes, width: float) -> np.ndarray:
    """Boxes of the horizontally flipped image (``width`` = map-frame width): ``x1' = width - x2``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1)


# ------------------------------------------------------------------------------------------------ RoI pooling
def roi_pool(fmap: torch.Tensor, boxes, output_size: int | tuple[int, int] = 7, stride: int = 16) -> torch.Tensor:
    """RoI max-pooling as Caffe's ROIPooling layer computes it (Girshick 2015, "Fast R-CNN", Sec. 2.1; the layer
    of the Faster R-CNN models Salvador et al. 2016 use, ``spatial_scale = 1/stride``): the box (map-frame pixels)
    covers the cells of :func:`roi_extent` (edges rounded, inclusive end, at least one cell); with
    ``bin = width / pw`` in float32, bin ``j`` covers columns ``start + floor(j * bin)`` ..
    ``start + ceil((j + 1) * bin)`` (end-exclusive) clipped to the map, likewise rows; a bin left empty by the
    clipping is 0. ``fmap``: (C, H, W); returns (R, C, ph, pw). The one RoI pooling of the package (RPN, RPA,
    CA-SR and the detector). Differentiable in ``fmap`` (the gradient goes to each bin's arg-max)."""
    if fmap.ndim != 3:
        raise ValueError(f"roi_pool expects one (C, H, W) map, got shape {tuple(fmap.shape)}")
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if ph < 1 or pw < 1:
        raise ValueError(f"output_size must be >= 1, got {output_size}")
    b = as_boxes(boxes).detach().cpu()
    C, H, W = fmap.shape
    R = b.shape[0]
    if R == 0:
        return fmap.new_zeros(0, C, ph, pw)
    if not bool(torch.isfinite(b).all()):
        raise ValueError("roi_pool: boxes must be finite")
    ext = torch.from_numpy(roi_extent(b.numpy(), stride))
    x0, y0, rw, rh = ext.unbind(1)

    def bins(start: torch.Tensor, size: torch.Tensor, n: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.arange(n, dtype=torch.float32)
        bin_size = size.to(torch.float32)[:, None] / torch.tensor(float(n), dtype=torch.float32)  # float32 as Caffe
        lo = torch.floor(k[None] * bin_size).long() + start[:, None]
        hi = torch.ceil((k[None] + 1) * bin_size).long() + start[:, None]
        return lo.clamp(0, limit), hi.clamp(0, limit)

    bx0, bx1 = bins(x0, rw, pw, W)  # (R, pw)
    by0, by1 = bins(y0, rh, ph, H)  # (R, ph)
    X0 = bx0[:, None, :].expand(R, ph, pw).reshape(-1)
    X1 = bx1[:, None, :].expand(R, ph, pw).reshape(-1)
    Y0 = by0[:, :, None].expand(R, ph, pw).reshape(-1)
    Y1 = by1[:, :, None].expand(R, ph, pw).reshape(-1)
    full = (X1 > X0) & (Y1 > Y0)
    # empty bins read one valid cell and are zeroed below (no gradient reaches that cell)
    Xs, Ys = torch.where(full, X0, 0).clamp(max=W - 1), torch.where(full, Y0, 0).clamp(max=H - 1)
    Xw, Yh = torch.where(full, X1 - X0, 1), torch.where(full, Y1 - Y0, 1)
    # exact max of every bin (2-D sparse table of ops.integral.window_max, differentiable): (R*ph*pw, C)
    v = window_max(fmap if fmap.is_floating_point() else fmap.float(), torch.stack([Xs, Ys, Xw, Yh], 1))
    if not bool(full.all()):
        v = v * full.to(device=v.device, dtype=v.dtype)[:, None]
    return v.reshape(R, ph, pw, C).permute(0, 3, 1, 2).contiguous()


def grid_boxes(height: int, width: int, levels: int = 3, stride: int = 16) -> np.ndarray:
    """The rigid R-MAC grid (Tolias et al. 2016, Sec. 3; :func:`~instance_search.ops.pooling.rmac_regions`) of an
    ``height x width`` map as map-frame pixel boxes (R, 4) -- the baseline the proposals are compared with."""
    r = rmac_regions(height, width, levels=levels).astype(np.float64)
    return np.stack([r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]], 1) * stride
