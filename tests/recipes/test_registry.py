"""The recipe registry and what the product does with it: every paper's recipe by name, options checked against
the recipe that owns them, fitted state stored inside the index (sha256-verified), and bad input refused with a
message naming it, leaving what is stored unchanged."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from instance_search.cli import app
from instance_search.collection import Collection
from instance_search.errors import ISearchError
from instance_search.index.store import CorruptIndexError
from instance_search.recipes import REGISTRY, Features, Recipe, RecipeError

pytestmark = pytest.mark.slow  # its module fixture alone takes seconds (pytest --durations)

SIZE = 128


def test_every_paper_has_its_recipes_in_its_module():
    where = {name: cls.__module__.rsplit(".", 1)[-1] for name, cls in REGISTRY.items()}
    assert {where[n] for n in ("mac", "rmac", "spoc", "gem")} == {"tolias"}
    assert where["ng-vlad"] == "ng" and where["selective"] == "hoang"
    assert where["learned-rmac"] == "gordo" and where["ipa"] == "salvador" and where["rpa"] == "salvador"
    for cls in REGISTRY.values():  # every recipe cites its paper
        assert cls.paper and cls.__doc__


def test_unknown_recipe_and_foreign_options_are_refused():
    with pytest.raises(RecipeError, match="unknown recipe 'vlad'.*rmac"):
        Recipe("vlad")
    with pytest.raises(RecipeError, match="'mask' belongs to selective"):
        Recipe("rmac", extra={"mask": "max"})
    assert issubclass(RecipeError, ISearchError)


def test_tolias_recipes_equal_the_papers_formulas_on_a_hand_made_map():
    """MAC = max per channel (Tolias Eq. 1); R-MAC's local vectors are L2-normalised region MACs; the global
    vector is L2(sum of L2 rows)."""
    X = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3) % 7
    mac = Recipe("mac").local_from_map(X)
    want = np.array([X[0].max(), X[1].max()], np.float32)
    assert np.allclose(mac[0], want / np.linalg.norm(want))
    loc = Recipe("rmac", levels=1).local_from_map(X)
    assert np.allclose(np.linalg.norm(loc, axis=1), 1, atol=1e-6)
    g = Recipe("rmac", levels=1).finalize(loc)
    s = (loc / np.linalg.norm(loc, axis=1, keepdims=True)).sum(0)
    assert np.allclose(g, s / np.linalg.norm(s), atol=1e-6)


def test_features_name_the_missing_map():
    f = Features({("conv5_3", 1.0): torch.zeros(2, 2, 2)})
    with pytest.raises(RecipeError, match="'conv4_3' at scale 2.*conv5_3@1"):
        f.map("conv4_3", 2.0)


def _photos(data_dir, tmp_path, ids, name):
    d = tmp_path / name
    d.mkdir()
    for i in ids:
        shutil.copy(data_dir / "ukbench1000" / f"ukbench{i:05d}.jpg", d)
    return d


def _listing(root):
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.read_bytes()) for p in root.rglob("*")
                  if p.is_file())


NG = ["--recipe", "ng-vlad", "--layer", "conv5_1", "--k", "4", "--dim", "8", "--max-size", str(SIZE)]


def test_cli_refusals_create_nothing(tmp_path, data_dir):
    photos = _photos(data_dir, tmp_path, range(4), "photos")
    run = CliRunner().invoke
    idx = tmp_path / "idx"
    for args, said in [
        (["--recipe", "vlad"], "unknown recipe 'vlad'"),
        (["--recipe", "rmac", "--mask", "max"], "--mask does not apply to recipe 'rmac'"),
        (["--recipe", "rmac", "--scales", "2"], "scales must include 1"),
        (["--recipe", "rmac", "--fit-on", str(photos)], "learns nothing from a training collection"),
        (NG, "--fit-on"),
        ([*NG, "--fit-on", str(tmp_path / "nowhere")], "nowhere"),
        (["--recipe", "ng-vlad", "--scales", "1,x"], "--scales '1,x'"),
    ]:
        res = run(app, ["index", str(photos), "--index", str(idx), "-q", *args])
        assert res.exit_code == 2 and said in res.output, (args, res.output)
        assert "Traceback" not in res.output
        assert not idx.exists(), args


@pytest.fixture(scope="module")
def ng_index(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("ng")
    photos = _photos(data_dir, tmp, range(8), "photos")
    train = _photos(data_dir, tmp, range(100, 112), "train")
    res = CliRunner().invoke(app, ["index", str(photos), "--index", str(tmp / "idx"), "-q", *NG,
                                   "--fit-on", str(train)])
    assert res.exit_code == 0, res.output
    return photos, tmp / "idx"


def test_fitted_state_lives_in_the_index_and_is_verified(ng_index, tmp_path):
    photos, idx = ng_index
    moved = tmp_path / "elsewhere"
    shutil.copytree(idx, moved)
    col = Collection.open(moved)
    assert col.recipe.name == "ng-vlad" and col.recipe.fitted and col.whitening is None
    state = col.store.settings["recipe_state"]
    assert (moved / "fitted" / state).is_file()
    q = str(photos / "ukbench00003.jpg")
    assert col.search(q, top=1)[0].path.endswith("ukbench00003.jpg")
    # the same recipe, refitted from the stored state, describes a query exactly as the index does
    vec, _, _ = col.describe(q)
    stored = col.vectors()[[r["path"] for r in col.records()].index(str((photos / "ukbench00003.jpg").resolve()))]
    assert np.allclose(vec, stored, atol=1e-5)

    before = _listing(moved)
    blob = (moved / "fitted" / state).read_bytes()
    (moved / "fitted" / state).write_bytes(blob[:100] + bytes([blob[100] ^ 1]) + blob[101:])
    with pytest.raises(CorruptIndexError, match=state):
        Collection.open(moved)
    res = CliRunner().invoke(app, ["search", q, "--index", str(moved)])
    assert res.exit_code != 0 and state in res.output and "Traceback" not in res.output
    (moved / "fitted" / state).unlink()
    with pytest.raises(CorruptIndexError, match=state):
        Collection.open(moved)
    # nothing else was touched by the failed opens
    after = {p for p, *_ in _listing(moved)}
    assert after == {p for p, *_ in before} - {f"fitted/{state}"}


def test_state_of_another_recipe_is_refused(ng_index):
    _, idx = ng_index
    col = Collection.open(idx)
    state = col.recipe.state_dict()
    other = Recipe("selective", max_size=SIZE, extra={"mask": "max", "embedding": "temb",
                                                        "aggregation": "democratic", "dim": 512})
    with pytest.raises(RecipeError):
        other.load_state_dict(state)
    with pytest.raises(RecipeError):
        Recipe("rmac").load_state_dict(state)


def test_whitening_of_another_backbone_is_refused(ng_index, tmp_path, data_dir):
    """A whitening file learned for 2048-D vectors given to a 512-D VGG16 index: a clear error naming the file,
    and no index is created."""
    from instance_search.fitted.whitening import PCAWhitening

    rng = np.random.default_rng(0)
    w = PCAWhitening().fit(rng.standard_normal((3000, 2048)).astype(np.float32), dim=64, shrinkage="auto")
    wfile = w.save(tmp_path / "w2048.npz")
    photos = _photos(data_dir, tmp_path, range(4), "p")
    res = CliRunner().invoke(app, ["index", str(photos), "--index", str(tmp_path / "idx"), "-q", "--max-size",
                                   str(SIZE), "--backbone", "vgg16", "--whitening", str(wfile)])
    assert res.exit_code == 2 and "w2048.npz" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "idx").exists()


def test_cli_multiscale_flags_reach_the_recipe(tmp_path, data_dir):
    """`--scales 1,0.5 --scale-pool gem --scale-p 2` (issue 14, multi-scale descriptors) end up in the index's
    recipe, and its vectors equal the recipe's own description of the photo."""
    photos = _photos(data_dir, tmp_path, range(4), "photos")
    res = CliRunner().invoke(app, ["index", str(photos), "--index", str(tmp_path / "idx"), "-q", "--recipe", "gem",
                                   "--scales", "1,0.5", "--scale-pool", "gem", "--scale-p", "2",
                                   "--max-size", "256", "--whitening", "none"])
    assert res.exit_code == 0, res.output
    col = Collection.open(tmp_path / "idx")
    assert col.recipe.extra == {"scales": [1.0, 0.5], "scale_pool": "gem", "scale_p": 2.0}
    q = str(photos / "ukbench00002.jpg")
    vec, _, _ = col.describe(q)
    i = [r["path"] for r in col.records()].index(str((photos / "ukbench00002.jpg").resolve()))
    assert np.allclose(vec, col.vectors()[i], atol=1e-5)


def test_default_backbone_is_the_recipes():
    """The global descriptors default to ResNet-50 (chosen by measurement, docs/results.md), the other papers'
    recipes to VGG16, whose named layers they use; a stored recipe without a backbone predates that and is
    VGG16; a named backbone is kept."""
    for name in ("mac", "rmac", "gem", "spoc"):
        assert Recipe(name).backbone == "resnet50" and Recipe(name).to_dict()["backbone"] == "resnet50"
    assert Recipe("ipa").backbone == "vgg16"
    assert Recipe("rmac", backbone="vgg16").backbone == "vgg16"
    assert Recipe.from_dict({"name": "rmac", "max_size": 512}).backbone == "vgg16"
    assert Recipe.from_dict(Recipe("gem").to_dict()).backbone == "resnet50"
