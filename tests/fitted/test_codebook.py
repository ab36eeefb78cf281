"""Codebooks, local PCA and T-emb post-processing: fitting, save/load, error handling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instance_search.fitted.codebook import CodebookFileError, GMMCodebook, KMeansCodebook, LocalPCA, TembPostprocess
from instance_search.ops.embeddings import temb


@pytest.fixture(scope="module")
def feats() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 8)) * 3
    x = centres[rng.integers(0, 4, 400)] + 0.3 * rng.standard_normal((400, 8))
    return x.astype(np.float32)


def test_kmeans_fit_assign_roundtrip(feats, tmp_path):
    cb = KMeansCodebook(k=4).fit(feats)
    assert cb.centroids.shape == (4, 8)
    a = cb.assign(feats)
    assert a.shape == (400,) and a.dtype == np.int64 and set(a) == {0, 1, 2, 3}
    # deterministic with the fixed seed
    np.testing.assert_array_equal(KMeansCodebook(k=4).fit(feats).centroids, cb.centroids)
    path = cb.save(tmp_path / "sub" / "km.npz")
    assert [p.name for p in path.parent.iterdir()] == ["km.npz"]  # no temp file left behind
    cb2 = KMeansCodebook.load(path)
    assert cb2.k == 4 and cb2.niter == cb.niter and cb2.seed == cb.seed
    np.testing.assert_array_equal(cb2.centroids, cb.centroids)
    np.testing.assert_array_equal(cb2.assign(torch.from_numpy(feats)), a)


def test_unfitted_models_refuse(tmp_path):
    for model, call in [(KMeansCodebook(k=3), "assign"), (GMMCodebook(k=3), "posteriors"),
                        (LocalPCA(d=2), "transform"), (TembPostprocess(drop=1), "transform")]:
        with pytest.raises(RuntimeError, match="not fitted"):
            getattr(model, call)(np.zeros((2, 4)))
        with pytest.raises(RuntimeError, match="not fitted"):
            model.save(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="at least 10"):
        KMeansCodebook(k=10).fit(np.zeros((5, 3), dtype=np.float32))


def test_corrupt_and_foreign_files_name_the_path(feats, tmp_path):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(CodebookFileError, match="broken.npz"):
        KMeansCodebook.load(bad)
    path = KMeansCodebook(k=4).fit(feats).save(tmp_path / "km.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CodebookFileError, match="truncated.npz"):
        KMeansCodebook.load(truncated)
    with pytest.raises(CodebookFileError, match="expected GMMCodebook"):
        GMMCodebook.load(path)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        KMeansCodebook.load(tmp_path / "missing.npz")


def test_gmm_fit_posteriors_roundtrip(feats, tmp_path):
    g = GMMCodebook(k=4, max_iter=50).fit(feats)
    assert g.means.shape == g.variances.shape == (4, 8) and g.weights.shape == (4,)
    assert np.all(g.variances > 0) and g.weights.sum() == pytest.approx(1.0, abs=1e-5)
    P = g.posteriors(feats)
    np.testing.assert_allclose(P.sum(1), 1.0, atol=1e-5)
    g2 = GMMCodebook.load(g.save(tmp_path / "gmm.npz"))
    np.testing.assert_array_equal(g2.means, g.means)
    np.testing.assert_array_equal(g2.assign(feats), g.assign(feats))


def test_local_pca(feats, tmp_path):
    p = LocalPCA(d=3).fit(feats)
    y = p.transform(feats)
    assert y.shape == (400, 3) and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    # components are orthonormal and sorted by decreasing variance
    np.testing.assert_allclose(p.components @ p.components.T, np.eye(3), atol=1e-8)
    assert np.all(np.diff(p.eigvals) <= 0)
    p2 = LocalPCA.load(p.save(tmp_path / "pca.npz"))
    np.testing.assert_allclose(p2.transform(feats), y, atol=1e-6)
    assert isinstance(p2.transform(torch.from_numpy(feats)), torch.Tensor)
    w = LocalPCA(d=3, whiten=True).fit(feats)
    np.testing.assert_allclose(LocalPCA.load(w.save(tmp_path / "w.npz")).transform(feats), w.transform(feats), atol=1e-6)


def test_temb_postprocess_whitens_and_drops(feats, tmp_path):
    x = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    anchors = KMeansCodebook(k=3).fit(x).centroids
    E = temb(x, anchors)  # (400, 24)
    post = TembPostprocess(drop=8).fit(E)
    assert post.output_dim == 24 - 8
    Y = post.transform(E)
    assert Y.shape == (400, 16)
    np.testing.assert_allclose(Y.mean(0), 0.0, atol=1e-4)
    cov = np.cov(Y.astype(np.float64), rowvar=False, bias=True)
    top = cov[:8, :8]  # the well-conditioned leading kept components are white
    np.testing.assert_allclose(top, np.eye(8), atol=1e-3)
    assert TembPostprocess(drop=8, out_dim=5).fit(E).transform(E[0]).shape == (5,)
    post2 = TembPostprocess.load(post.save(tmp_path / "temb.npz"))
    assert post2.drop == 8 and post2.out_dim is None
    np.testing.assert_allclose(post2.transform(E), Y, atol=1e-6)
    with pytest.raises(ValueError, match="dimension"):
        post.transform(E[:, :10])
