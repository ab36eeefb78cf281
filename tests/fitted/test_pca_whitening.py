"""PCA-whitening: whitening property, dimension reduction, agreement with an SVD reference,
persistence and error handling."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from instance_search.fitted import NotFittedError, PCAWhitening, WhiteningFileError
from instance_search.fitted.whitening import _ledoit_wolf
from instance_search.ops import rmac


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    n, d = 3000, 12
    scales = np.linspace(5.0, 0.2, d)
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (rng.normal(size=(n, d)) * scales) @ Q.T + rng.normal(size=d) * 3


def svd_reference(X: np.ndarray, dim: int) -> np.ndarray:
    """Slow textbook PCA-whitening via SVD of the centred data: Z = Xc V_k diag(lambda_k)^-1/2."""
    Xc = X - X.mean(axis=0)
    _, S, Vt = np.linalg.svd(Xc, full_matrices=False)
    lam = S ** 2 / X.shape[0]
    return Xc @ Vt[:dim].T / np.sqrt(lam[:dim])


def align_signs(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Flip the columns of A to agree in sign with B (eigenvectors are defined up to sign)."""
    return A * np.sign(np.sum(A * B, axis=0))


def test_whitened_training_data_has_identity_covariance(data):
    w = PCAWhitening().fit(data, trained_on="synthetic")
    assert w.dim == w.in_dim == 12 and w.n_samples == 3000 and w.trained_on == "synthetic" and w.created
    Z = w.transform(data, normalize=False)
    assert Z.shape == (3000, 12) and Z.dtype == np.float64
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(Z.T @ Z / len(Z), np.eye(12), atol=1e-8)


def test_dimension_reduction_keeps_top_components(data):
    w = PCAWhitening().fit(data, dim=4)
    assert w.dim == 4 and w.components.shape == (4, 12)
    lam_all = np.sort(np.linalg.eigvalsh(np.cov(data.T, bias=True)))[::-1]
    np.testing.assert_allclose(w.eigenvalues, lam_all[:4], rtol=1e-10)
    assert np.all(np.diff(w.eigenvalues) < 0)
    # unwhitened projection (power 0): variances are the top-4 eigenvalues
    p = PCAWhitening().fit(data, dim=4, power=0.0)
    Y = p.transform(data, normalize=False)
    np.testing.assert_allclose(Y.var(axis=0), lam_all[:4], rtol=1e-10)


@pytest.mark.parametrize("dim", [12, 5])
def test_matches_svd_reference(data, dim):
    ref = svd_reference(data, dim)
    got = PCAWhitening().fit(data, dim=dim).transform(data, normalize=False)
    np.testing.assert_allclose(align_signs(got, ref), ref, atol=1e-8)
    normed = PCAWhitening().fit(data, dim=dim).transform(data[:50])
    np.testing.assert_allclose(normed, ref[:50] / np.linalg.norm(ref[:50], axis=1, keepdims=True) *
                               np.sign(np.sum(got[:50] * ref[:50], axis=0)), atol=1e-8)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0)


def test_single_vector_and_dtypes(data):
    w = PCAWhitening().fit(data, dim=6)
    x32 = data[:3].astype(np.float32)
    out = w.transform(x32)
    assert out.dtype == np.float32 and out.shape == (3, 6)
    np.testing.assert_allclose(w.transform(data[0]), w.transform(data[:1])[0])
    np.testing.assert_allclose(w(data[:3]), w.transform(data[:3]))
    with pytest.raises(ValueError, match="12-dimensional"):
        w.transform(np.zeros((2, 11)))


def test_torch_input(data):
    w = PCAWhitening().fit(torch.from_numpy(data), dim=6)  # fit accepts torch too
    x = torch.tensor(data[:10], dtype=torch.float32, requires_grad=True)
    y = w.transform(x)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == (10, 6)
    np.testing.assert_allclose(y.detach().numpy(), w.transform(data[:10]), atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert w.transform(torch.from_numpy(data[0])).shape == (6,)


def test_used_as_rmac_whitening():
    rng = np.random.default_rng(3)
    w = PCAWhitening().fit(rng.random(size=(400, 8)), dim=5)
    X = torch.rand(8, 7, 9)
    v = rmac(X, whitening=w)
    assert v.shape == (5,) and abs(float(v.norm()) - 1) < 1e-5


def test_save_load_round_trip(tmp_path, data):
    w = PCAWhitening().fit(data, dim=7, trained_on="rparis250 regions", shrinkage=0.1, reg=0.01)
    path = tmp_path / "sub" / "whiten.bin"  # any name: written exactly there, no ".npz" appended
    assert w.save(path) == path and path.is_file()
    assert os.listdir(path.parent) == ["whiten.bin"]  # no temporary file left behind
    with np.load(path, allow_pickle=False) as z:  # loadable without pickles
        assert "components" in z.files
    w2 = PCAWhitening.load(path)
    assert (w2.dim, w2.in_dim, w2.n_samples, w2.trained_on, w2.created) == \
        (7, 12, 3000, "rparis250 regions", w.created)
    assert w2.shrinkage == pytest.approx(0.1) and w2.reg == pytest.approx(0.01) and w2.power == 0.5
    np.testing.assert_array_equal(w2.transform(data[:20]), w.transform(data[:20]))
    w.save(path)  # overwriting works (os.replace)
    assert PCAWhitening.load(str(path)).dim == 7


def test_load_errors_name_the_path(tmp_path, data):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        PCAWhitening.load(missing)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not an npz archive at all" * 10)
    with pytest.raises(WhiteningFileError, match="garbage.npz"):
        PCAWhitening.load(garbage)
    good = PCAWhitening().fit(data, dim=3).save(tmp_path / "good.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WhiteningFileError, match="truncated.npz"):
        PCAWhitening.load(truncated)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.arange(3))
    with pytest.raises(WhiteningFileError, match="foreign.npz"):
        PCAWhitening.load(foreign)
    with np.load(good, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["components"] = arrays["components"][:, :5]  # wrong shape
    bad_shape = tmp_path / "badshape.npz"
    np.savez(bad_shape, **arrays)
    with pytest.raises(WhiteningFileError, match="badshape.npz.*shape"):
        PCAWhitening.load(bad_shape)


def test_unfitted_errors(tmp_path):
    w = PCAWhitening()
    assert not w.is_fitted and w.dim == 0
    with pytest.raises(NotFittedError, match="not fitted"):
        w.transform(np.zeros((2, 3)))
    with pytest.raises(RuntimeError):
        w.save(tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_few_samples_rank_and_regularisation():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 16))
    with pytest.warns(RuntimeWarning, match="only 6 vectors"):
        w = PCAWhitening().fit(X)
    assert w.dim == 5  # N - 1 non-zero-variance directions
    with pytest.raises(ValueError, match="span only 5"):
        PCAWhitening().fit(X, dim=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ws = PCAWhitening().fit(X, dim=16, shrinkage="auto")
        wr = PCAWhitening().fit(X, dim=16, reg=0.1)
    for m in (ws, wr):
        Y = m.transform(rng.normal(size=(4, 16)), normalize=False)
        assert np.isfinite(Y).all() and np.abs(Y).max() < 1e3
    assert 0 < ws.shrinkage <= 1
    # reg adds reg * mean eigenvalue before the inverse square root
    mean_eig = np.trace(np.cov(X.T, bias=True)) / 16
    np.testing.assert_allclose(wr.scale, (wr.eigenvalues + 0.1 * mean_eig) ** -0.5)


def test_ledoit_wolf_matches_sklearn():
    sk = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(5)
    X = rng.normal(size=(40, 25)) @ rng.normal(size=(25, 25))
    Xc = X - X.mean(axis=0)
    assert _ledoit_wolf(Xc, Xc.T @ Xc / 40) == pytest.approx(sk.ledoit_wolf_shrinkage(X), rel=1e-9)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError):
        PCAWhitening().fit(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="identical"):
        PCAWhitening().fit(np.ones((10, 4)))
    with pytest.raises(ValueError):
        PCAWhitening().fit(np.array([[1.0, np.nan], [0.0, 1.0], [2.0, 2.0]]))
    with pytest.raises(ValueError):
        PCAWhitening().fit(np.random.default_rng(0).normal(size=(50, 4)), shrinkage="lots")
