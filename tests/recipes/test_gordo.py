"""Recipe ``learned-rmac`` (Gordo et al. 2016, recipes/gordo.py): options validated and refused, the local
vectors are the trained head's region vectors (checked against a per-region loop), model files checked."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instance_search.nets import rmac_head as rn
from instance_search.nets.rpn import RPN, save_rpn
from instance_search.ops.pooling import rmac_regions
from instance_search.recipes import gordo as GO
from instance_search.recipes.base import Recipe, RecipeError


@pytest.fixture(scope="module")
def fmap():
    """A conv5_3-like map: sparse, non-negative, 512 x 13 x 17 (real maps: tests/nets/test_rmac_net.py)."""
    g = torch.Generator().manual_seed(0)
    return torch.relu(torch.randn(512, 13, 17, generator=g) - 0.5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A head-only network (input conv5_3) with a non-trivial shift and projection, saved as a model file."""
    torch.manual_seed(0)
    net = rn.RMACNet("head", out_dim=256)
    with torch.no_grad():
        net.head.shift.normal_(0, 0.05)
        net.head.fc.weight.normal_(0, 0.05)
    path = rn.save_model(net, tmp_path_factory.mktemp("gordo") / "model.pt")
    return net, path


def _reference(net, fmap, cells):
    """One region at a time: MAC, L2, W (x + s), L2 (Gordo et al. 2016, Sec. 3.1), in float64."""
    W, s = net.head.fc.weight.detach().double(), net.head.shift.detach().double()
    out = []
    for x, y, w, h in np.asarray(cells).tolist():
        f = fmap[:, y:y + h, x:x + w].amax(dim=(1, 2)).double()
        v = W @ (f / f.norm() + s)
        out.append((v / v.norm()).numpy())
    return np.stack(out)


def test_options_are_validated_and_foreign_ones_refused(model):
    _, path = model
    with pytest.raises(RecipeError, match="needs a trained model"):
        Recipe("learned-rmac")
    ok = {"model": str(path)}
    with pytest.raises(RecipeError, match="trained on vgg16, not 'resnet50'"):
        Recipe("learned-rmac", backbone="resnet50", extra=ok)
    with pytest.raises(RecipeError, match="regions must be 'grid' or 'rpn', got 'boxes'"):
        Recipe("learned-rmac", extra={**ok, "regions": "boxes"})
    with pytest.raises(RecipeError, match="needs an RPN model"):
        Recipe("learned-rmac", extra={**ok, "regions": "rpn"})
    for bad in (0, -3, 2.5, "many"):
        with pytest.raises(RecipeError, match="proposals must be an integer >= 1"):
            Recipe("learned-rmac", extra={**ok, "proposals": bad})
    with pytest.raises(RecipeError, match="'pooling' belongs to ipa"):
        Recipe("learned-rmac", extra={**ok, "pooling": "sum"})
    with pytest.raises(FileNotFoundError):
        GO.learned_rmac_recipe(path.with_name("missing.pt"))


def test_grid_local_vectors_are_the_heads_region_vectors(model, fmap):
    net, path = model
    rec = GO.learned_rmac_recipe(path, max_size=512)
    assert rec.extra["sha256"] == rn.read_config(path)["state_sha256"] and rec.whitened is False
    assert Recipe.from_dict(rec.to_dict()) == rec
    local = rec.local_from_map(fmap)
    cells = rmac_regions(*fmap.shape[-2:], levels=3)
    assert local.shape == (len(cells), 256) and local.dtype == np.float32
    np.testing.assert_allclose(local, _reference(net, fmap, cells), rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the network's own output is the finalised vector
        want = net.head(fmap).numpy()
    np.testing.assert_allclose(rec.finalize(local), want, rtol=1e-4, atol=1e-5)


def test_rpn_regions_are_the_proposals(model, fmap, tmp_path):
    net, path = model
    torch.manual_seed(1)
    rpn = RPN(mid_channels=16, sizes=(32, 64, 128)).eval()
    rpath = save_rpn(rpn, tmp_path / "rpn.pt")
    rec = GO.learned_rmac_recipe(path, rpn=rpath, proposals=7)
    assert rec.extra["regions"] == "rpn" and rec.extra["proposals"] == 7
    local = rec.local_from_map(fmap)
    cells = rpn.proposal_cells(fmap, 7)
    assert len(local) == len(cells) <= 7
    np.testing.assert_allclose(local, _reference(net, fmap, cells), rtol=1e-4, atol=1e-5)


def test_a_changed_model_file_is_refused(fmap, tmp_path):
    torch.manual_seed(2)
    path = rn.save_model(rn.RMACNet("head", out_dim=64), tmp_path / "m.pt")
    rec = GO.learned_rmac_recipe(path)
    rn.save_model(rn.RMACNet("head", out_dim=64).requires_grad_(False).apply(
        lambda m: torch.nn.init.normal_(m.weight) if isinstance(m, torch.nn.Linear) else None), path)
    with pytest.raises(rn.ModelFileError, match="changed since the index was built"):
        rec.local_from_map(fmap)
