"""Reference transcriptions shared by tests and benchmarks (not tests themselves): Caffe's ROIPooling forward
pass, line by line (caffe-fast-rcnn ``roi_pooling_layer.cpp``, the layer of the Faster R-CNN models Salvador et
al. 2016 use), and the edge-case boxes it is checked on."""
from __future__ import annotations

import math

import numpy as np


def _c_round(v: np.float32) -> int:
    """C's roundf: halves away from zero."""
    v = float(v)
    return int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5))


def caffe_roi_pool(X: np.ndarray, rois: np.ndarray, pooled_h: int, pooled_w: int, spatial_scale: float) -> np.ndarray:
    """ROIPoolingLayer<float>::Forward_cpu, transcribed (one image, rois as (R, 4) x1, y1, x2, y2)."""
    C, height, width = X.shape
    f = np.float32
    scale = f(spatial_scale)
    out = np.zeros((len(rois), C, pooled_h, pooled_w), np.float32)
    for n, roi in enumerate(np.asarray(rois, np.float32)):
        roi_start_w = _c_round(roi[0] * scale)
        roi_start_h = _c_round(roi[1] * scale)
        roi_end_w = _c_round(roi[2] * scale)
        roi_end_h = _c_round(roi[3] * scale)
        roi_height = max(roi_end_h - roi_start_h + 1, 1)
        roi_width = max(roi_end_w - roi_start_w + 1, 1)
        bin_size_h = f(roi_height) / f(pooled_h)
        bin_size_w = f(roi_width) / f(pooled_w)
        for c in range(C):
            for ph in range(pooled_h):
                for pw in range(pooled_w):
                    hstart = int(math.floor(f(ph) * bin_size_h))
                    wstart = int(math.floor(f(pw) * bin_size_w))
                    hend = int(math.ceil(f(ph + 1) * bin_size_h))
                    wend = int(math.ceil(f(pw + 1) * bin_size_w))
                    hstart = min(max(hstart + roi_start_h, 0), height)
                    hend = min(max(hend + roi_start_h, 0), height)
                    wstart = min(max(wstart + roi_start_w, 0), width)
                    wend = min(max(wend + roi_start_w, 0), width)
                    is_empty = (hend <= hstart) or (wend <= wstart)
                    if is_empty:
                        out[n, c, ph, pw] = 0
                        continue
                    m = -np.finfo(np.float32).max
                    for h in range(hstart, hend):
                        for w in range(wstart, wend):
                            if X[c, h, w] > m:
                                m = X[c, h, w]
                    out[n, c, ph, pw] = m
    return out


H, W, S = 6, 9, 16

EDGE_BOXES = np.array([
    [0, 0, W * S, H * S],            # the whole map frame (end rounds to W: clipped)
    [0, 0, W * S - 1, H * S - 1],    # Caffe's inclusive whole image
    [16, 16, 32, 32],                # edges on cell borders
    [8, 8, 24, 24],                  # edges on half cells: round half away from zero
    [7.99, 8.01, 23.99, 24.01],      # just either side of the half
    [32, 16, 33, 17],                # a 1-cell box
    [40, 40, 41, 41],                # a tiny box inside one cell, rounding to two cells
    [0, 0, 3, 3],                    # a tiny box at the top-left corner
    [W * S - 10, H * S - 10, W * S, H * S],  # a box at the bottom-right border (rounds past the map)
    [-30, -20, 50, 40],              # a box reaching out of the map
    [W * S - 2, 0, W * S, 20],       # a sliver at the right border: its start rounds to W, every bin empty
    [60, 50, 20, 30],                # inverted: Caffe takes max(width, 1)
    [100.5, 20.25, 130.75, 88.5],
], dtype=np.float64)
