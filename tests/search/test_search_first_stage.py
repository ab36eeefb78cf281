"""search(..., first_stage=): the whole query image ranks and the box's cells of its map re-rank (Salvador et al.
2016, the default of ipa / rpa), or the box crop does both (the revisited protocol, the benchmarks)."""
from __future__ import annotations

import types

import numpy as np
import pytest
from PIL import Image

from instance_search import search as S
from instance_search.images import BoxError
from instance_search.ops.boxes import boxes_to_cells


class FakeCol:
    """What search() reads of a Collection: describe(), the recipe's first-stage choice and max size."""

    def __init__(self, first_stage=None):
        method = types.SimpleNamespace() if first_stage is None else types.SimpleNamespace(first_stage=first_stage)
        self.recipe = types.SimpleNamespace(method=method, max_size=160)
        self.rerank_options = {}
        self.search_state = S.SearchState()
        self.calls = []

    def describe(self, image, box=None):
        self.calls.append((image.size, box))
        w, h = image.size if box is None else (box[2] - box[0], box[3] - box[1])
        H, W = max(1, h // 16), max(1, w // 16)
        fmap = np.arange(4 * H * W, dtype=np.float32).reshape(4, H, W)
        return np.full(3, float(W)), None, fmap


@pytest.fixture
def captured(monkeypatch):
    got = {}

    def fake_described(col, vec, fmap, top, reranker, shortlist, qe, expansion, timings=None):
        got["vec"], got["fmap"] = vec, fmap
        return []

    monkeypatch.setattr(S, "search_described", fake_described)
    return got


def test_first_stage_image_ranks_with_the_whole_image_and_reranks_with_the_box_cells(captured):
    img = Image.new("RGB", (320, 240))  # described as it is (max side 320 > 160: resized by describe, not here)
    col = FakeCol("image")
    box = (40, 30, 200, 170)
    S.search(col, img, box=box, rerank="casr")
    assert col.calls == [((320, 240), None)]  # the whole image, no crop
    H, W = 15, 20
    assert captured["vec"][0] == W
    cells = boxes_to_cells(np.array([box], float) * (W * 16 / 320), 16, H, W)[0]
    x, y, w, h = cells
    full = np.arange(4 * H * W, dtype=np.float32).reshape(4, H, W)
    np.testing.assert_array_equal(captured["fmap"], full[:, y:y + h, x:x + w])
    assert cells.tolist() == [3, 2, 11, 10]  # Caffe rounding: 2.5 -> 3 .. 12.5 -> 13, 1.875 -> 2 .. 10.625 -> 11, inclusive


def test_first_stage_box_and_the_recipes_default(captured):
    img = Image.new("RGB", (320, 240))
    col = FakeCol("image")
    S.search(col, img, box=(40, 30, 200, 170), first_stage="box")
    assert col.calls == [((320, 240), (40, 30, 200, 170))]  # the crop, as before
    other = FakeCol()  # a recipe without a choice: the crop
    S.search(other, img, box=(40, 30, 200, 170))
    assert other.calls[0][1] == (40, 30, 200, 170)
    nobox = FakeCol("image")
    S.search(nobox, img)  # no box: the whole image either way
    assert nobox.calls == [((320, 240), None)]
    with pytest.raises(ValueError, match="first_stage must be one of box, image"):
        S.search(col, img, box=(40, 30, 200, 170), first_stage="crop")
    with pytest.raises(BoxError, match="outside"):
        S.search(col, img, box=(400, 300, 500, 400), first_stage="image")


def test_salvador_recipes_choose_the_whole_image():
    from instance_search.recipes.salvador import IPA, RPA

    assert IPA.first_stage == "image" and RPA.first_stage == "image"
    assert "Gordo" in RPA.__doc__ and "R-MAC" in RPA.__doc__
