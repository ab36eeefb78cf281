"""Recipes ``ipa`` and ``rpa`` (Salvador et al. 2016, recipes/salvador.py): options validated and refused, the
local vectors equal the pooling of the map / of the RPN's proposals (checked box by box), RPN files checked."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instance_search.nets.rpn import RPN, RPNFileError, save_rpn
from instance_search.ops.boxes import boxes_to_cells
from instance_search.recipes import salvador as SV
from instance_search.recipes.base import Features, Recipe, RecipeError


@pytest.fixture(scope="module")
def fmap():
    g = torch.Generator().manual_seed(0)
    return torch.relu(torch.randn(512, 15, 11, generator=g) - 0.5)


@pytest.fixture(scope="module")
def rpn_file(tmp_path_factory):
    torch.manual_seed(0)
    rpn = RPN(mid_channels=16, sizes=(32, 64, 128)).eval()
    return rpn, save_rpn(rpn, tmp_path_factory.mktemp("salvador") / "rpn.pt")


def test_ipa_options_and_vectors(fmap):
    with pytest.raises(RecipeError, match="pooling must be 'sum' or 'max', got 'mean'"):
        Recipe("ipa", extra={"pooling": "mean"})
    with pytest.raises(RecipeError, match="'rpn' belongs to"):
        Recipe("ipa", extra={"rpn": "x.pt"})
    x = fmap.double().numpy()
    for pooling, ref in (("sum", x.sum(axis=(1, 2))), ("max", x.max(axis=(1, 2)))):
        got = Recipe("ipa", extra={"pooling": pooling}).local(Features({("conv5_3", 1.0): fmap}))
        assert got.shape == (1, 512)
        np.testing.assert_allclose(got[0], ref / np.linalg.norm(ref), rtol=1e-5, atol=1e-6)


def test_rpa_options_are_validated(rpn_file):
    _, path = rpn_file
    with pytest.raises(RecipeError, match="needs a trained region proposal network"):
        Recipe("rpa")
    for bad in (0, "ten", 1.5):
        with pytest.raises(RecipeError, match="proposals must be an integer >= 1"):
            Recipe("rpa", extra={"rpn": str(path), "proposals": bad})
        with pytest.raises(RecipeError, match="proposals must be an integer >= 1"):
            SV.rpa_recipe(path, proposals=bad)
    with pytest.raises(RecipeError, match="'model' belongs to learned-rmac"):
        Recipe("rpa", extra={"rpn": str(path), "model": "m.pt"})
    with pytest.raises(FileNotFoundError, match="nothing.json: RPN config not found"):
        SV.rpa_recipe(path.with_name("nothing.pt"))


def test_rpa_local_vectors_are_the_proposals_macs(rpn_file, fmap):
    rpn, path = rpn_file
    rec = SV.rpa_recipe(path, proposals=9, max_size=300)
    assert rec.extra == {"rpn": str(path.resolve()), "sha256": rec.extra["sha256"], "proposals": 9}
    assert rec.layer == "conv5_3" and Recipe.from_dict(rec.to_dict()) == rec
    local = rec.local_from_map(fmap)
    boxes = rpn.propose(fmap, 9)[0].numpy()
    assert local.shape == (len(boxes), 512) and 1 <= len(boxes) <= 9
    for r, b in enumerate(boxes):  # each proposal projected by hand as Caffe's RoI pooling does, its MAC, L2
        rnd = [int(np.floor(abs(v) + 0.5) * np.sign(v)) for v in (np.float32(b) * np.float32(1 / 16)).tolist()]
        x0, y0 = max(rnd[0], 0), max(rnd[1], 0)
        x1 = min(max(rnd[2], rnd[0]) + 1, fmap.shape[-1])
        y1 = min(max(rnd[3], rnd[1]) + 1, fmap.shape[-2])
        f = fmap[:, y0:y1, x0:x1].double().amax(dim=(1, 2)).numpy()
        np.testing.assert_allclose(local[r], f / np.linalg.norm(f), rtol=1e-5, atol=1e-6)
    cells = boxes_to_cells(boxes, 16, *fmap.shape[-2:])
    raw = SV.rpa_local_vectors(rec.extra, fmap)
    np.testing.assert_allclose(raw, fmap[:, None].new_tensor(
        np.stack([fmap[:, y:y + h, x:x + w].amax(dim=(1, 2)).numpy() for x, y, w, h in cells.tolist()])).numpy())


def test_a_changed_rpn_file_is_refused(fmap, tmp_path):
    torch.manual_seed(3)
    path = save_rpn(RPN(mid_channels=8), tmp_path / "r.pt")
    rec = SV.rpa_recipe(path, proposals=4)
    torch.manual_seed(4)
    save_rpn(RPN(mid_channels=8), path)
    with pytest.raises(RPNFileError, match="changed since the index was built"):
        rec.local_from_map(fmap)
