"""Selection masks over a conv feature map (Hoang, Do, Le Tan & Cheung 2017, "Selective deep convolutional
features for image retrieval", Sec. 3.1, Eqs. 1–3).

A mask is a boolean ``(H, W)`` array over the spatial cells of a non-negative ``(C, H, W)`` map; the kept
cells give the local features ``(N, C)`` of :func:`masked_features`. Maps may be numpy or torch; masks
come back as the same kind (``sift_mask`` always returns numpy).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["max_mask", "sum_mask", "sift_mask", "sift_keypoints", "masked_features", "VLSIFT_LIKE"]


def _map(X) -> tuple[torch.Tensor, bool]:
    is_torch = isinstance(X, torch.Tensor)
    t = X.detach() if is_torch else torch.from_numpy(np.ascontiguousarray(np.asarray(X)))
    if t.ndim != 3:
        raise ValueError(f"feature map must be (C, H, W), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t, is_torch


def _out(mask: torch.Tensor, is_torch: bool):
    return mask if is_torch else mask.cpu().numpy()


def max_mask(X):
    """MAX-mask (Hoang et al. 2017, Eq. 2): True at the arg-max location of each channel (union over channels).

    Conventions of the authors' ``apply_mask.m`` (the paper is silent on them): ties go to the first cell in
    COLUMN-major order (smallest column, then smallest row: MATLAB's ``max`` over an (H, W) map), and a channel
    that is zero everywhere (dead after ReLU) marks its first cell, ``(0, 0)``, like any other tie.
    """
    t, is_torch = _map(X)
    c, h, w = t.shape
    mask = np.zeros(h * w, dtype=bool)
    if h * w and c:
        colmajor = t.detach().cpu().transpose(1, 2).reshape(c, w * h).numpy()  # index = col * H + row
        first = np.argmax(colmajor, axis=1)  # numpy: the first maximal index
        rows, cols = first % h, first // h
        mask[rows * w + cols] = True
    out = torch.from_numpy(mask.reshape(h, w))
    return _out(out.to(t.device), is_torch)


def sum_mask(X):
    """SUM-mask (Hoang et al. 2017, Eq. 3): True where the channel sum ``S(x, y) = sum_c X_c(x, y)`` is at
    least the median of all channel sums (median as in ``numpy.median``: mean of the two middle values
    for an even count; MATLAB's ``prctile(S, 50)`` of the authors' code is the same number)."""
    t, is_torch = _map(X)
    s = t.sum(0)
    if s.numel() == 0:
        return _out(torch.zeros_like(s, dtype=torch.bool), is_torch)
    med = torch.quantile(s.reshape(-1).to(torch.float64), 0.5)
    return _out(s.to(torch.float64) >= med, is_torch)


def sift_mask(keypoints_xy, image_hw: tuple[int, int], map_hw: tuple[int, int], radius: int = 1) -> np.ndarray:
    """SIFT-mask (Hoang et al. 2017, Eq. 1): True at the feature-map cells around SIFT keypoints.

    ``keypoints_xy`` is (N, 2) as 0-based (x, y) image pixels (OpenCV's convention). As in the authors'
    ``apply_mask.m``: the 1-based position ``x + 1`` maps to the 1-based cell column ``round((x + 1) W_map /
    W_img)`` (rounding half away from zero), likewise the row, and the ``(2 radius + 1)^2`` block of cells
    around it (radius 1: 3x3), cut at the map's border, is kept. With no keypoint (flat or tiny image) the
    mask is all-True, i.e. no selection, rather than an empty set (where the authors' code gives a zero vector).
    """
    hi, wi = int(image_hw[0]), int(image_hw[1])
    hm, wm = int(map_hw[0]), int(map_hw[1])
    if hi <= 0 or wi <= 0:
        raise ValueError(f"image_hw must be positive, got {image_hw}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    kp = np.asarray(keypoints_xy, dtype=np.float64).reshape(-1, 2)
    if kp.shape[0] == 0:
        return np.ones((hm, wm), dtype=bool)
    col1 = np.floor((kp[:, 0] + 1.0) * wm / wi + 0.5).astype(np.int64)  # 1-based, half away from zero (>= 0)
    row1 = np.floor((kp[:, 1] + 1.0) * hm / hi + 0.5).astype(np.int64)
    mask = np.zeros((hm, wm), dtype=bool)
    # a block [max(1, c - r), min(W, c + r)] (1-based) marked through a 2-D difference array + cumulative sums
    r0, r1 = np.maximum(row1 - radius, 1) - 1, np.minimum(row1 + radius, hm)  # 0-based half-open
    c0, c1 = np.maximum(col1 - radius, 1) - 1, np.minimum(col1 + radius, wm)
    ok = (r0 < r1) & (c0 < c1)
    diff = np.zeros((hm + 1, wm + 1), dtype=np.int64)
    np.add.at(diff, (r0[ok], c0[ok]), 1)
    np.add.at(diff, (r0[ok], c1[ok]), -1)
    np.add.at(diff, (r1[ok], c0[ok]), -1)
    np.add.at(diff, (r1[ok], c1[ok]), 1)
    mask[:] = diff.cumsum(0).cumsum(1)[:hm, :wm] > 0
    return mask


#: OpenCV settings that match the density of the authors' ``vl_sift(I, 'PeakThresh', 4, 'edgethresh', 10)`` on a
#: 0-255 grey image. VLFeat starts at octave 0, so keypoints of OpenCV's upsampled octave -1 are dropped; the
#: contrast threshold was then measured (benchmarks/bench_hoang_parity.py --sift, VLFeat 0.9.21 under Octave, 20
#: Holidays-811 images): vl_sift finds 2220 keypoints, OpenCV's defaults 12827 (5.8x), octave 0 with
#: contrastThreshold 0.04 / 0.05 / 0.06 / 0.07 / 0.08: 3541 / 3048 / 2625 / 2240 / 1823 -> 0.07 (1.01x). The two
#: detectors place keypoints differently: on conv5_3 maps the 3x3 SIFT masks keep 61 % of the cells here vs 78 %
#: with vl_sift (IoU 0.56); contrastThreshold 0.03 keeps 79 % (IoU 0.67) with 1.8x the keypoints.
VLSIFT_LIKE = {"contrast_threshold": 0.07, "edge_threshold": 10.0, "first_octave": 0}


def sift_keypoints(img, max_keypoints: int = 0, *, contrast_threshold: float = VLSIFT_LIKE["contrast_threshold"],
                   edge_threshold: float = VLSIFT_LIKE["edge_threshold"],
                   first_octave: int = VLSIFT_LIKE["first_octave"]) -> np.ndarray:
    """SIFT keypoint locations (N, 2) float32 as 0-based (x, y) pixels of a PIL image (OpenCV ``cv2.SIFT_create``).

    Defaults follow the authors' detector setting (:data:`VLSIFT_LIKE`); ``first_octave=-1``,
    ``contrast_threshold=0.04`` are OpenCV's own defaults. ``max_keypoints = 0`` keeps all (OpenCV's
    ``nfeatures``). Needs ``opencv-python-headless``.
    """
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("sift_keypoints needs OpenCV: pip install opencv-python-headless") from exc
    if first_octave not in (-1, 0):
        raise ValueError(f"first_octave must be -1 (OpenCV's upsampled octave) or 0, got {first_octave}")
    gray = np.asarray(img.convert("L"), dtype=np.uint8)
    sift = cv2.SIFT_create(nfeatures=int(max_keypoints), contrastThreshold=float(contrast_threshold),
                           edgeThreshold=float(edge_threshold))
    kps = sift.detect(gray, None)
    if first_octave == 0:
        kps = [kp for kp in kps if (kp.octave & 255) != 255]  # octave byte 255 = -1, the upsampled image
    if not kps:
        return np.zeros((0, 2), dtype=np.float32)
    return np.array([kp.pt for kp in kps], dtype=np.float32)


def masked_features(X, mask):
    """Local features (N, C) at the True cells of ``mask`` (row-major order), same kind as ``X``."""
    t, is_torch = _map(X)
    m = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask, dtype=bool))
    m = m.to(torch.bool).to(t.device)
    if tuple(m.shape) != tuple(t.shape[1:]):
        raise ValueError(f"mask shape {tuple(m.shape)} does not match map cells {tuple(t.shape[1:])}")
    feats = t[:, m].T.contiguous()
    return feats if is_torch else feats.numpy()
