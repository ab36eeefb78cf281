"""Selection masks over a conv feature map (Hoang, Do, Le Tan & Cheung 2017, "Selective deep convolutional
features for image retrieval", Sec. 3.1, Eqs. 1–3).

A mask is a boolean ``(H, W)`` array over the spatial cells of a non-negative ``(C, H, W)`` map; the kept
cells give the local features ``(N, C)`` of :func:`masked_features`. Maps may be numpy or torch; masks
come back as the same kind (``sift_mask`` always returns numpy).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["max_mask", "sum_mask", "sift_mask", "sift_keypoints", "masked_features"]


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

    Ties go to the first cell in row-major order. Channels whose maximum is ``<= 0`` (dead after ReLU:
    every cell ties) are ignored, since their arg-max carries no information.
    """
    t, is_torch = _map(X)
    c, h, w = t.shape
    mask = torch.zeros(h * w, dtype=torch.bool, device=t.device)
    flat = t.reshape(c, h * w)
    if h * w:
        vals, idx = flat.max(dim=1)
        mask[idx[vals > 0]] = True
    return _out(mask.reshape(h, w), is_torch)


def sum_mask(X):
    """SUM-mask (Hoang et al. 2017, Eq. 3): True where the channel sum ``S(x, y) = sum_c X_c(x, y)`` is at
    least the median of all channel sums (median as in ``numpy.median``: mean of the two middle values
    for an even count)."""
    t, is_torch = _map(X)
    s = t.sum(0)
    if s.numel() == 0:
        return _out(torch.zeros_like(s, dtype=torch.bool), is_torch)
    med = torch.quantile(s.reshape(-1).to(torch.float64), 0.5)
    return _out(s.to(torch.float64) >= med, is_torch)


def sift_mask(keypoints_xy, image_hw: tuple[int, int], map_hw: tuple[int, int]) -> np.ndarray:
    """SIFT-mask (Hoang et al. 2017, Eq. 1): True at the feature-map cells that hold a SIFT keypoint.

    ``keypoints_xy`` is (N, 2) as (x, y) image pixels; a keypoint maps to cell
    ``(round(y * H_map / H_img), round(x * W_map / W_img))``, clipped into the map. With no keypoint
    (flat or tiny image) the mask falls back to all-True, i.e. no selection, rather than an empty set.
    """
    hi, wi = int(image_hw[0]), int(image_hw[1])
    hm, wm = int(map_hw[0]), int(map_hw[1])
    if hi <= 0 or wi <= 0:
        raise ValueError(f"image_hw must be positive, got {image_hw}")
    kp = np.asarray(keypoints_xy, dtype=np.float64).reshape(-1, 2)
    if kp.shape[0] == 0:
        return np.ones((hm, wm), dtype=bool)
    cols = np.clip(np.rint(kp[:, 0] * wm / wi), 0, wm - 1).astype(np.int64)
    rows = np.clip(np.rint(kp[:, 1] * hm / hi), 0, hm - 1).astype(np.int64)
    mask = np.zeros((hm, wm), dtype=bool)
    mask[rows, cols] = True
    return mask


def sift_keypoints(img, max_keypoints: int = 0) -> np.ndarray:
    """SIFT keypoint locations (N, 2) float32 as (x, y) pixels of a PIL image (OpenCV ``cv2.SIFT_create``).

    ``max_keypoints = 0`` keeps all (OpenCV's ``nfeatures``). Needs ``opencv-python-headless``.
    """
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("sift_keypoints needs OpenCV: pip install opencv-python-headless") from exc
    gray = np.asarray(img.convert("L"), dtype=np.uint8)
    sift = cv2.SIFT_create(nfeatures=int(max_keypoints))
    kps = sift.detect(gray, None)
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
