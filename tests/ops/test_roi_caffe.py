"""ops.boxes.roi_pool / boxes_to_cells against a line-by-line transcription of Caffe's ROIPooling forward pass
(caffe-fast-rcnn ``roi_pooling_layer.cpp``, the layer of the Faster R-CNN models Salvador et al. 2016 use)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instance_search.ops import boxes as B
from instance_search.ops.pooling import region_macs

from reference_caffe import EDGE_BOXES, H, S, W, caffe_roi_pool  # noqa: E402


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
