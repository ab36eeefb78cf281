"""Learned R-MAC as a network (Gordo et al. 2016, Sec. 3.1): before training it IS the non-learned R-MAC + PCA-whitening."""
import json
import math

import numpy as np
import pytest
import torch

from instance_search.collection import fit_whitening
from instance_search.images import load_image
from instance_search.nets import rmac_head as rn
from instance_search.nets import rpn as NR
from instance_search.ops import boxes as B
from instance_search.recipes import gordo as GO
from instance_search.ops.pooling import region_macs, rmac, rmac_regions
from instance_search.ops.normalize import l2n
from instance_search.recipes.base import Recipe

pytestmark = pytest.mark.slow  # its module fixture alone takes seconds (pytest --durations)

SIZE = 256


@pytest.fixture(scope="module")
def vgg():
    from instance_search.backbones import load_backbone

    torch.manual_seed(0)
    return load_backbone("vgg16", progress=False)


@pytest.fixture(scope="module")
def maps(vgg, data_dir):
    """pool4 and conv5_3 (exact fp32) of real photos: UKBench views and Paris landmarks (different aspect ratios)."""
    paths = [data_dir / "ukbench1000" / f"ukbench{i:05d}.jpg" for i in (0, 1, 4, 8)]
    paths += sorted((data_dir / "rparis250" / "jpg").glob("*.jpg"))[:2]
    out = []
    for p in paths:
        img = load_image(p, max_size=SIZE)
        f = vgg.features(img, layers=["pool4", "conv5_3"])
        out.append((f[("pool4", 1.0)], f[("conv5_3", 1.0)]))
    return out


@pytest.fixture(scope="module")
def whitening(maps):
    """PCA-whitening learned on the regional MACs of the same photos (shrunk: only a few hundred regions)."""
    rows = np.concatenate([l2n(region_macs(c5, rmac_regions(*c5.shape[-2:])).numpy()) for _, c5 in maps])
    return fit_whitening(rows, dim=512, trained_on="test photos")


def test_head_equals_rmac_with_whitening(maps, whitening):
    head = rn.RMACHead(512, 512).init_from_whitening(whitening)
    recipe = Recipe("rmac", backbone="vgg16")
    for _, c5 in maps:
        ref = rmac(c5, whitening=whitening)  # ops.pooling: L2(sum L2(W(L2(f_R))))
        ref2 = recipe.finalize(recipe.local_from_map(c5), whitening)  # the index's path
        with torch.no_grad():
            got = head(c5)
            got_b = head(c5[None])[0]
        assert got.shape == (512,)
        assert torch.max(torch.abs(got - ref)).item() < 1e-5
        assert np.max(np.abs(got.numpy() - ref2)) < 1e-5
        assert torch.max(torch.abs(got_b - ref)).item() < 1e-5


def test_identity_head_is_unwhitened_rmac(maps):
    head = rn.RMACHead(512, 512)
    for _, c5 in maps:
        with torch.no_grad():
            assert torch.max(torch.abs(head(c5) - rmac(c5))).item() < 1e-5


def test_network_from_pool4_equals_backbone_rmac(vgg, maps, whitening):
    """conv5_1..3 run by the network on the cached pool4 = the backbone's conv5_3; + head = R-MAC + whitening."""
    net = rn.RMACNet("conv5").init_from_backbone(vgg)
    net.head.init_from_whitening(whitening)
    assert net.input_layer == "pool4" and net.conv_names == ["conv5_1", "conv5_2", "conv5_3"]
    with torch.no_grad():
        got = net.embed([p4 for p4, _ in maps], batch=4)
    for k, (_, c5) in enumerate(maps):
        assert torch.max(torch.abs(got[k] - rmac(c5, whitening=whitening))).item() < 1e-5
    # the 'head' variant takes conv5_3 itself
    head_only = rn.RMACNet("head")
    head_only.head.init_from_whitening(whitening)
    assert len(head_only.trunk) == 0
    with torch.no_grad():
        got2 = head_only.embed([c5 for _, c5 in maps])
    assert torch.max(torch.abs(got2 - got)).item() < 1e-5


def test_regions_are_an_argument(maps, whitening):
    _, c5 = maps[0]
    head = rn.RMACHead(512, 512).init_from_whitening(whitening)
    grid = rmac_regions(*c5.shape[-2:])
    with torch.no_grad():
        assert torch.allclose(head(c5, grid), head(c5), atol=1e-6)
        # per-image proposals in a batch: each image its own boxes
        props = [grid[:3], np.array([[0, 0, c5.shape[-1], c5.shape[-2]]])]
        both = head(torch.stack([c5, c5]), props)
        assert torch.allclose(both[0], rmac(c5, regions=grid[:3], whitening=whitening), atol=1e-5)
        # one region = the whole map: whitened MAC
        mac_w = l2n(torch.as_tensor(whitening.transform(l2n(c5.amax(dim=(1, 2)))[None].numpy())[0]))
        assert torch.allclose(both[1], mac_w.float(), atol=1e-5)
    # pixel boxes -> cells (stride 16) as Caffe's RoI pooling: edges rounded, inclusive end, clipped
    cells = B.boxes_to_cells([[0, 0, 32, 16], [17, 5, 40, 60], [230, 170, 400, 300]], 16, 12, 16)
    assert cells.tolist() == [[0, 0, 3, 2], [1, 0, 3, 5], [14, 11, 2, 1]]
    with pytest.raises(ValueError, match="inverted"):
        B.boxes_to_cells([[10, 10, 5, 20]], 16, 12, 16)
    with pytest.raises(ValueError, match="outside"):
        head(c5, np.array([[0, 0, 100, 2]]))


def test_gradients_reach_trainable_layers_only(vgg, maps, whitening):
    net = rn.RMACNet("conv5").init_from_backbone(vgg)
    net.head.init_from_whitening(whitening)
    (p4a, _), (p4b, _) = maps[0], maps[1]
    d = net.embed([p4a, p4b])
    (d[0] @ d[1]).backward()
    for name in ("trunk.conv5_1.weight", "trunk.conv5_3.bias", "head.shift", "head.fc.weight"):
        g = dict(net.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert not any(n.startswith("trunk.conv4") for n, _ in net.named_parameters())
    with pytest.raises(ValueError, match="pool4"):
        net(torch.zeros(1, 256, 8, 8))
    with pytest.raises(ValueError, match="unknown train_layers"):
        rn.RMACNet("conv9")


def test_save_load_and_use_in_a_collection(vgg, maps, whitening, tmp_path, data_dir):
    """A (perturbed) model saved as state dict + JSON describes images in an index exactly as the network does."""
    net = rn.RMACNet("conv5").init_from_backbone(vgg)
    net.head.init_from_whitening(whitening)
    with torch.no_grad():  # make the conv5 weights differ from ImageNet, so using them is visible
        net.trunk.conv5_3.weight.mul_(1.0 + 0.3 * torch.randn_like(net.trunk.conv5_3.weight))
    path = rn.save_model(net, tmp_path / "model.pt", note="test")
    cfg = json.loads((tmp_path / "model.json").read_text())
    assert cfg["train_layers"] == "conv5" and cfg["note"] == "test" and cfg["backbone_weights_sha256"]
    state = torch.load(path, weights_only=True)
    assert set(state) == set(net.state_dict())
    net2, _ = rn.load_model(path)
    with torch.no_grad():
        want = net.embed([p4 for p4, _ in maps])
        assert torch.equal(net2.embed([p4 for p4, _ in maps]), want)

    # the product: isearch index --recipe learned-rmac --model model.pt
    from typer.testing import CliRunner

    from instance_search.cli.main import app
    from instance_search.collection import Collection

    photos = [data_dir / "ukbench1000" / f"ukbench{i:05d}.jpg" for i in (0, 1, 4, 8)]
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos:
        (folder / p.name).write_bytes(p.read_bytes())
    res = CliRunner().invoke(app, ["index", str(folder), "--index", str(tmp_path / "idx"), "--recipe", "learned-rmac",
                                   "--model", str(path), "--max-size", str(SIZE), "--quiet"])
    assert res.exit_code == 0, res.output
    col = Collection.open(tmp_path / "idx")
    assert col.recipe.name == "learned-rmac" and col.whitening is None
    vecs = col.vectors()
    order = {r["path"]: k for k, r in enumerate(col.records())}
    for k, p in enumerate(photos):
        v = vecs[order[str((folder / p.name).resolve())]]
        assert np.max(np.abs(v - want[k].numpy())) < 1e-4  # fp32 pool4 here vs the index's own forward pass
    hits = col.search(folder / photos[1].name, top=2)
    assert hits[0].path.endswith(photos[1].name) and hits[0].score > 0.999
    # the ImageNet conv5 would give other vectors: the trained layers are really used
    plain = Recipe("rmac", backbone="vgg16")
    assert np.max(np.abs(plain.finalize(plain.local_from_map(maps[0][1]), whitening) - want[0].numpy())) > 1e-3

    # bad input names the problem
    res = CliRunner().invoke(app, ["index", str(folder), "--index", str(tmp_path / "idx2"), "--recipe", "learned-rmac"])
    assert res.exit_code != 0 and "--model" in res.output
    with pytest.raises(ValueError, match="needs a trained model"):
        Recipe("learned-rmac")
    (tmp_path / "model.pt").write_bytes(path.read_bytes()[:-10])
    with pytest.raises(rn.ModelFileError, match="model.pt"):
        rn.load_model(tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="config not found"):
        rn.load_model(tmp_path / "other.pt")


def test_recipe_with_rpn_regions_pools_over_the_proposals(vgg, maps, whitening, tmp_path):
    """``learned_rmac_recipe(model, rpn=...)`` (Gordo et al. 2016, Sec. 3.2): the local vectors are the learned
    region vectors of the RPN's top-k boxes of the (trained) conv5_3 map, checked region by region."""

    net = rn.RMACNet("conv5").init_from_backbone(vgg)
    net.head.init_from_whitening(whitening)
    model = rn.save_model(net, tmp_path / "model.pt")
    torch.manual_seed(0)
    rpn = NR.RPN(mid_channels=16, max_size=SIZE)
    rpath = NR.save_rpn(rpn, tmp_path / "rpn.pt")
    rec = GO.learned_rmac_recipe(model, max_size=SIZE, rpn=rpath, proposals=10)
    assert rec.extra["regions"] == "rpn" and rec.extra["proposals"] == 10
    assert Recipe.from_dict(rec.to_dict()) == rec
    c5 = maps[4][1]
    local = rec.local_from_map(c5)
    boxes = rpn.propose(c5, 10)[0].numpy()
    assert local.shape == (len(boxes), 512)
    def c_round(v):  # C's round(): halves away from zero (Caffe's ROIPooling rounds box edges so)
        return int(math.floor(abs(v) + 0.5)) * (1 if v >= 0 else -1)

    for r, b in enumerate(boxes):  # one proposal at a time: MAC of its cells, L2, W(x + s), L2
        # Caffe's RoI extent: edges rounded to cells, inclusive end, at least one cell, clipped to the map
        x0, y0 = c_round(float(b[0]) / 16), c_round(float(b[1]) / 16)
        x1 = max(c_round(float(b[2]) / 16), x0) + 1
        y1 = max(c_round(float(b[3]) / 16), y0) + 1
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, c5.shape[-1]), min(y1, c5.shape[-2])
        f = c5[:, y0:y1, x0:x1].amax(dim=(1, 2)).double()
        f = f / f.norm()
        v = (net.head.fc.weight.double() @ (f + net.head.shift.double())).detach()
        np.testing.assert_allclose(local[r], (v / v.norm()).numpy(), rtol=1e-4, atol=1e-5)
    grid = GO.learned_rmac_recipe(model, max_size=SIZE)
    assert "regions" not in grid.extra and grid.local_from_map(c5).shape[0] == len(rmac_regions(*c5.shape[-2:]))
    with pytest.raises(ValueError, match="proposals"):
        GO.learned_rmac_recipe(model, rpn=rpath, proposals=0)
    with pytest.raises(ValueError, match="regions must be"):
        Recipe("learned-rmac", extra={**rec.extra, "regions": "selective-search"}).local_from_map(c5)


def test_cli_index_with_rpn_regions(vgg, maps, whitening, tmp_path, data_dir):
    """``isearch index --recipe learned-rmac --model M --regions rpn --rpn R --proposals 10`` (and ``--recipe rpa``):
    the index's vectors are the recipe's, computed on the same photos."""
    from typer.testing import CliRunner

    from instance_search.cli.main import app
    from instance_search.collection import Collection

    net = rn.RMACNet("conv5").init_from_backbone(vgg)
    net.head.init_from_whitening(whitening)
    model = rn.save_model(net, tmp_path / "model.pt")
    torch.manual_seed(0)
    rpath = NR.save_rpn(NR.RPN(mid_channels=16, max_size=SIZE), tmp_path / "rpn.pt")
    folder = tmp_path / "photos"
    folder.mkdir()
    photos = [data_dir / "ukbench1000" / f"ukbench{i:05d}.jpg" for i in (0, 1, 4, 8)]
    for p in photos:
        (folder / p.name).write_bytes(p.read_bytes())
    common = ["--max-size", str(SIZE), "--whitening", "none", "--quiet", "--no-maps"]
    res = CliRunner().invoke(app, ["index", str(folder), "--index", str(tmp_path / "idx"), "--recipe", "learned-rmac",
                                   "--model", str(model), "--regions", "rpn", "--rpn", str(rpath), "--proposals",
                                   "10"] + common)
    assert res.exit_code == 0, res.output
    col = Collection.open(tmp_path / "idx")
    assert col.recipe.extra["regions"] == "rpn" and col.recipe.extra["proposals"] == 10
    vecs = col.vectors()
    order = {r["path"]: k for k, r in enumerate(col.records())}
    for k, p in enumerate(photos):
        want = col.recipe.finalize(col.recipe.local_from_map(maps[k][1]))
        assert np.max(np.abs(vecs[order[str((folder / p.name).resolve())]] - want)) < 1e-4
    res = CliRunner().invoke(app, ["index", str(folder), "--index", str(tmp_path / "idx2"), "--recipe", "rpa",
                                   "--rpn", str(rpath), "--proposals", "12"] + common)
    assert res.exit_code == 0, res.output
    assert Collection.open(tmp_path / "idx2").recipe.extra["proposals"] == 12
    res = CliRunner().invoke(app, ["index", str(folder), "--index", str(tmp_path / "idx3"), "--recipe", "learned-rmac",
                                   "--model", str(model), "--regions", "rpn"] + common)
    assert res.exit_code != 0 and "--rpn" in res.output
