"""ops.boxes.roi_pool / boxes_to_cells against a line-by-line transcription of Caffe's ROIPooling forward pass
(caffe-fast-rcnn ``roi_pooling_layer.cpp``, the layer of the Faster R-CNN models Salvador et al. 2016 use)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instance_search.ops import boxes as B
from instance_search.ops.pooling import region_macs


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


@pytest.fixture(scope="module")
def fmap():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((5, H, W)).astype(np.float32)  # signed: an empty bin (0) differs from any max
    return X


@pytest.mark.parametrize("p", [(1, 1), (2, 2), (3, 2), (7, 7)])
def test_roi_pool_equals_caffe_on_edge_cases(fmap, p):
    got = B.roi_pool(torch.from_numpy(fmap), EDGE_BOXES, p, S).numpy()
    ref = caffe_roi_pool(fmap, EDGE_BOXES, p[0], p[1], 1.0 / S)
    np.testing.assert_array_equal(got, ref)


def test_roi_pool_equals_caffe_on_random_boxes(fmap):
    rng = np.random.default_rng(1)
    xy = rng.uniform(-20, [W * S + 10, H * S + 10], size=(300, 2))
    wh = rng.uniform(1, 90, size=(300, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    # and boxes snapped to multiples of 8 px (cell borders and half cells)
    snapped = np.round(boxes / 8) * 8
    snapped[:, 2:] = np.maximum(snapped[:, 2:], snapped[:, :2] + 8)
    for bx in (boxes, snapped):
        for p in ((1, 1), (7, 7)):
            got = B.roi_pool(torch.from_numpy(fmap), bx, p, S).numpy()
            np.testing.assert_array_equal(got, caffe_roi_pool(fmap, bx, p[0], p[1], 1.0 / S))


def test_some_edge_cases_by_hand(fmap):
    ext = B.roi_extent(EDGE_BOXES, S)
    assert ext[2].tolist() == [1, 1, 2, 2]   # 16/16 = 1 .. 32/16 = 2 inclusive
    assert ext[3].tolist() == [1, 1, 2, 2]   # 8/16 = .5 -> 1 .. 24/16 = 1.5 -> 2 (away from zero)
    assert ext[4].tolist() == [0, 1, 2, 2]   # .49938 -> 0, .500625 -> 1; 1.49938 -> 1, 1.500625 -> 2
    assert ext[5].tolist() == [2, 1, 1, 1]   # 32/16 = 2 .. 33/16 -> 2
    assert ext[11].tolist() == [4, 3, 1, 1]  # inverted: max(end - start + 1, 1) = 1
    X = torch.from_numpy(fmap)
    sliver = B.roi_pool(X, EDGE_BOXES[10:11], 7, S)
    assert torch.equal(sliver, torch.zeros_like(sliver))  # every bin empty: Caffe writes 0
    with pytest.raises(ValueError, match="outside the 6x9 map"):
        B.boxes_to_cells(EDGE_BOXES[10:11], S, H, W)


def test_boxes_to_cells_is_the_roi_pool_at_one_bin(fmap):
    X = torch.from_numpy(fmap)
    ok = np.array([i for i in range(len(EDGE_BOXES)) if i not in (10, 11)])
    cells = B.boxes_to_cells(EDGE_BOXES[ok], S, H, W)
    np.testing.assert_array_equal(region_macs(X, cells).numpy(), B.roi_pool(X, EDGE_BOXES[ok], 1, S)[:, :, 0, 0].numpy())
    assert cells[0].tolist() == [0, 0, W, H] and cells[1].tolist() == [0, 0, W, H]
    assert cells[9].tolist() == [0, 0, 4, 4]  # -30/16 -> -2 .. 50/16 -> 3 inclusive, clipped at 0
    # C rounding, not numpy's half-to-even
    assert B.caffe_round(np.array([0.5, 1.5, 2.5, -0.5, -2.5])).tolist() == [1, 2, 3, -1, -3]


def test_roi_pool_gradient_goes_to_each_bins_argmax(fmap):
    X = torch.from_numpy(fmap.copy()).requires_grad_(True)
    boxes = EDGE_BOXES[[2, 6, 9, 10, 12]]
    out = B.roi_pool(X, boxes, 3, S)
    out.sum().backward()
    ref = np.zeros_like(fmap)
    ext = B.roi_extent(boxes, S)
    for (x0, y0, w, h) in ext.tolist():
        for i in range(3):
            for j in range(3):
                ys = min(max(y0 + math.floor(i * np.float32(h) / 3), 0), H)
                ye = min(max(y0 + math.ceil((i + 1) * np.float32(h) / 3), 0), H)
                xs = min(max(x0 + math.floor(j * np.float32(w) / 3), 0), W)
                xe = min(max(x0 + math.ceil((j + 1) * np.float32(w) / 3), 0), W)
                if ye <= ys or xe <= xs:
                    continue
                for c in range(fmap.shape[0]):
                    win = fmap[c, ys:ye, xs:xe]
                    k = int(np.argmax(win))
                    ref[c, ys + k // win.shape[1], xs + k % win.shape[1]] += 1
    np.testing.assert_array_equal(X.grad.numpy(), ref)
