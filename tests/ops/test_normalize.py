"""ops.normalize.l2n: the package's one L2 normalisation, against a loop over the vectors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instance_search.ops.normalize import EPS, l2n


def _loop_l2n(a: np.ndarray, axis: int) -> np.ndarray:
    """Slow reference: each vector along ``axis`` divided by max(its Euclidean length, EPS)."""
    a = np.moveaxis(np.asarray(a, np.float64), axis, -1)
    out = np.empty_like(a)
    for idx in np.ndindex(a.shape[:-1]):
        v = a[idx]
        n = math.sqrt(sum(float(x) * float(x) for x in v))
        out[idx] = v / max(n, EPS)
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_l2n_matches_a_loop_numpy_and_torch(axis):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 5, 6))
    a[1, 2, :] = 0.0  # zero vectors (along the last axis) stay zero
    a[2, :, 3] = 1e-13  # below EPS along axis 1: divided by EPS
    ref = _loop_l2n(a, axis)
    np.testing.assert_allclose(l2n(a, dim=axis), ref, rtol=1e-12, atol=0)
    t = l2n(torch.from_numpy(a), dim=axis)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    np.testing.assert_allclose(t.numpy(), ref, rtol=1e-12, atol=0)


def test_l2n_dtypes_and_no_nan():
    assert l2n(np.zeros((2, 3), np.float32)).dtype == np.float32
    assert not np.isnan(l2n(np.zeros(4))).any()
    assert l2n(np.array([3, 4])).tolist() == pytest.approx([0.6, 0.8])  # integers become float32
    for dt in (torch.float16, torch.bfloat16):  # EPS underflows in half precision: normalised in float32
        z = torch.zeros(2, 8, dtype=dt)
        z[1] = 1e-3
        out = l2n(z)
        assert out.dtype == dt and not torch.isnan(out).any()
        assert torch.equal(out[0], torch.zeros(8, dtype=dt))
        assert float(out[1].float().norm()) == pytest.approx(1.0, rel=1e-2)
    h = l2n(np.array([[0.0, 0.0], [3e-3, 4e-3]], np.float16))
    assert h.dtype == np.float16 and not np.isnan(h).any() and h[1].astype(np.float32).tolist() == pytest.approx(
        [0.6, 0.8], rel=1e-3)


def test_l2n_is_differentiable():
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    l2n(x)[0, 0].backward()
    # d/dx0 (x0 / |x|) = 1/|x| - x0^2/|x|^3 = 0.2 - 9/125
    assert x.grad[0].tolist() == pytest.approx([0.2 - 9 / 125, -12 / 125])
