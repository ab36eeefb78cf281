"""Selection masks (Hoang et al. 2017, Eqs. 1–3) on a hand-made 3x4x5 feature map."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instance_search.ops.masks import masked_features, max_mask, sift_keypoints, sift_mask, sum_mask


@pytest.fixture
def fmap() -> np.ndarray:
    X = np.zeros((3, 4, 5), dtype=np.float32)
    X[0, 1, 2] = 9.0  # channel 0 peaks at (1, 2)
    X[0, 3, 0] = 2.0
    X[1, 0, 4] = 5.0  # channel 1 peaks at (0, 4) ...
    X[1, 2, 2] = 5.0  # ... tie at a later cell: the first in row-major order wins
    X[1, 3, 1] = 1.0
    X[2] = np.arange(20, dtype=np.float32).reshape(4, 5) * 0.1  # a ramp 0.0 .. 1.9 (row-major)
    return X


def test_max_mask(fmap):
    X = fmap.copy()
    X[2] = 0.0
    expected = np.zeros((4, 5), dtype=bool)
    expected[1, 2] = expected[0, 4] = True
    m = max_mask(X)
    assert m.dtype == bool and m.shape == (4, 5)
    np.testing.assert_array_equal(m, expected)
    X[2, 3, 3] = 0.5  # a live channel adds its own peak
    expected[3, 3] = True
    np.testing.assert_array_equal(max_mask(X), expected)
    mt = max_mask(torch.from_numpy(X))
    assert isinstance(mt, torch.Tensor) and mt.dtype == torch.bool
    np.testing.assert_array_equal(mt.numpy(), expected)


def test_sum_mask(fmap):
    # S = ramp + peaks: idx 4 -> 5.4, 7 -> 9.7, 12 -> 6.2, 15 -> 3.5, 16 -> 2.6, others 0.1 * idx.
    # The 10th / 11th smallest of the 20 sums are 1.1 and 1.3, so the median is 1.2 and the kept
    # cells are idx 4, 7, 12, 13, 14, 15, 16, 17, 18, 19.
    expected = np.zeros(20, dtype=bool)
    expected[[4, 7, 12, 13, 14, 15, 16, 17, 18, 19]] = True
    expected = expected.reshape(4, 5)
    m = sum_mask(fmap)
    assert m.dtype == bool and m.shape == (4, 5)
    np.testing.assert_array_equal(m, expected)
    np.testing.assert_array_equal(sum_mask(torch.from_numpy(fmap)).numpy(), expected)


def test_sift_mask_mapping_and_fallback():
    # image 100x200 (H x W) -> map 4x5: col = round(x * 5 / 200), row = round(y * 4 / 100)
    kp = np.array([[0.0, 0.0], [41.0, 13.0], [199.0, 99.0], [100.0, 60.0]])
    m = sift_mask(kp, image_hw=(100, 200), map_hw=(4, 5))
    expected = np.zeros((4, 5), dtype=bool)
    expected[0, 0] = True  # (0, 0)
    expected[1, 1] = True  # x=41 -> 1.025 -> 1, y=13 -> 0.52 -> 1
    expected[3, 4] = True  # (4.975 -> 5 clipped to 4, 3.96 -> 4 clipped to 3)
    expected[2, 2] = True  # x=100 -> 2.5 -> 2 (round half to even), y=60 -> 2.4 -> 2
    np.testing.assert_array_equal(m, expected)
    np.testing.assert_array_equal(sift_mask(np.zeros((0, 2)), (100, 200), (4, 5)), np.ones((4, 5), dtype=bool))


def test_masked_features(fmap):
    mask = np.zeros((4, 5), dtype=bool)
    mask[1, 2] = mask[0, 4] = True
    F = masked_features(fmap, mask)
    assert F.shape == (2, 3)
    np.testing.assert_allclose(F, [fmap[:, 0, 4], fmap[:, 1, 2]])  # row-major order
    Ft = masked_features(torch.from_numpy(fmap), torch.from_numpy(mask))
    assert isinstance(Ft, torch.Tensor) and Ft.shape == (2, 3)
    with pytest.raises(ValueError, match="mask shape"):
        masked_features(fmap, np.ones((5, 4), dtype=bool))


def test_sift_keypoints_on_synthetic_image():
    pytest.importorskip("cv2")
    from PIL import Image

    img = np.zeros((96, 128), dtype=np.uint8)
    img[20:50, 30:70] = 255
    img[60:80, 90:110] = 128
    kp = sift_keypoints(Image.fromarray(img))
    assert kp.ndim == 2 and kp.shape[1] == 2 and len(kp) > 0
    assert (kp[:, 0] >= 0).all() and (kp[:, 0] < 128).all() and (kp[:, 1] < 96).all()
    assert sift_keypoints(Image.new("RGB", (64, 48))).shape == (0, 2)
    assert sift_mask(kp, (96, 128), (6, 8)).sum() >= 1
