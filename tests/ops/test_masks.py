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
    X[1, 2, 2] = 5.0  # ... tie at (2, 2): column 2 comes before column 4, so (2, 2) wins (column-major)
    X[1, 3, 1] = 1.0
    X[2] = np.arange(20, dtype=np.float32).reshape(4, 5) * 0.1  # a ramp 0.0 .. 1.9 (row-major)
    return X


def _max_mask_reference(X):
    """The authors' create_max_mask (apply_mask.m) literally: per channel, MATLAB's max over rows then columns."""
    c, h, w = X.shape
    mask = np.zeros((h, w), dtype=bool)
    for j in range(c):
        f = X[j]
        p1 = f.argmax(0)  # per column: the first row of its maximum
        v1 = f.max(0)
        p2 = int(v1.argmax())  # the first column of the overall maximum
        mask[p1[p2], p2] = True
    return mask


def test_max_mask(fmap):
    X = fmap.copy()
    X[2] = 0.0  # a dead channel marks its first cell (0, 0), as in the authors' code
    expected = np.zeros((4, 5), dtype=bool)
    expected[1, 2] = expected[2, 2] = expected[0, 0] = True
    m = max_mask(X)
    assert m.dtype == bool and m.shape == (4, 5)
    np.testing.assert_array_equal(m, expected)
    X[2, 3, 3] = 0.5  # a live channel marks its own peak instead
    expected[0, 0], expected[3, 3] = False, True
    np.testing.assert_array_equal(max_mask(X), expected)
    mt = max_mask(torch.from_numpy(X))
    assert isinstance(mt, torch.Tensor) and mt.dtype == torch.bool
    np.testing.assert_array_equal(mt.numpy(), expected)
    rng = np.random.default_rng(0)
    for _ in range(20):  # random maps with many ties (few distinct values) and dead channels
        R = rng.integers(0, 3, (6, 5, 7)).astype(np.float32)
        R[rng.random(6) < 0.3] = 0.0
        np.testing.assert_array_equal(max_mask(R), _max_mask_reference(R))


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


def _sift_mask_reference(kp, hw, map_hw, r=1):
    """The authors' create_sift_mask (apply_mask.m) literally, with MATLAB's 1-based frames and round()."""
    H, W = hw
    Hf, Wf = map_hw
    mround = lambda v: int(np.floor(v + 0.5))  # noqa: E731  (MATLAB rounds half away from zero; v >= 0 here)
    mask = np.zeros((Hf, Wf))
    for x, y in kp:
        fx, fy = mround((x + 1) / (W / Wf)), mround((y + 1) / (H / Hf))  # vl_sift frames are 1-based
        mask[max(1, fy - r) - 1:min(Hf, fy + r), max(1, fx - r) - 1:min(Wf, fx + r)] = 1
    return mask > 0


def test_sift_mask_mapping_and_fallback():
    # image 100x200 (H x W) -> map 4x5: 1-based col = round((x + 1) * 5 / 200), row = round((y + 1) * 4 / 100)
    kp = np.array([[0.0, 0.0], [41.0, 13.0]])
    m = sift_mask(kp, image_hw=(100, 200), map_hw=(4, 5))
    expected = np.zeros((4, 5), dtype=bool)
    # (0, 0): 1-based (1, 1) -> cell round(0.025) = 0, round(0.04) = 0 -> block rows/cols max(1, -1)..1 -> 0..0
    # (41, 13): round(1.05) = 1, round(0.56) = 1 -> block 1..2 (1-based) -> rows 0..1, cols 0..1 (0-based)
    expected[0:2, 0:2] = True
    np.testing.assert_array_equal(m, expected)
    assert sift_mask(kp, (100, 200), (4, 5), radius=0).sum() == 1  # both in cell (0, 0)
    np.testing.assert_array_equal(sift_mask(np.zeros((0, 2)), (100, 200), (4, 5)), np.ones((4, 5), dtype=bool))
    rng = np.random.default_rng(1)
    for _ in range(20):
        hw, map_hw = (int(rng.integers(50, 400)), int(rng.integers(50, 400))), (int(rng.integers(2, 30)),
                                                                              int(rng.integers(2, 30)))
        pts = np.column_stack([rng.uniform(0, hw[1] - 1, 15), rng.uniform(0, hw[0] - 1, 15)])
        np.testing.assert_array_equal(sift_mask(pts, hw, map_hw), _sift_mask_reference(pts, hw, map_hw))
    with pytest.raises(ValueError, match="image_hw"):
        sift_mask(kp, (0, 10), (4, 5))


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
    # the authors' density (no upsampled octave, higher contrast threshold) keeps fewer than OpenCV's defaults
    from PIL import ImageFilter

    tex = Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 200), dtype=np.uint8))
    tex = tex.filter(ImageFilter.GaussianBlur(1))
    ours = sift_keypoints(tex)
    dense = sift_keypoints(tex, contrast_threshold=0.04, first_octave=-1)
    assert 0 < len(ours) < len(dense)
    with pytest.raises(ValueError, match="first_octave"):
        sift_keypoints(tex, first_octave=1)
    assert (kp[:, 0] >= 0).all() and (kp[:, 0] < 128).all() and (kp[:, 1] < 96).all()
    assert sift_keypoints(Image.new("RGB", (64, 48))).shape == (0, 2)
    assert sift_mask(kp, (96, 128), (6, 8)).sum() >= 1
