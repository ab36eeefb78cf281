"""Benchmark loaders on the real data in ../shared/data, and evaluation sanity checks on them."""
from __future__ import annotations

import json
import pickle
from functools import lru_cache
from math import comb

import numpy as np
import pytest
from PIL import Image

from instance_search.eval import metrics as ev
from instance_search.eval.datasets import (
    Benchmark,
    find_shared_data,
    load_benchmark,
    load_classic,
    load_gnd_pickle,
    load_holidays,
    load_revisited,
    load_ukbench,
)

RPARIS_QUERIES = ["paris_defense_000056", "paris_defense_000254", "paris_eiffel_000266", "paris_invalides_000072",
                  "paris_invalides_000360", "paris_louvre_000081", "paris_louvre_000135", "paris_louvre_000050",
                  "paris_louvre_000035", "paris_moulinrouge_000868", "paris_moulinrouge_000004",
                  "paris_defense_000038"]


@pytest.fixture(scope="module")
def benches(data_dir):
    return {n: load_benchmark(n) for n in ("ukbench", "holidays", "paris6k", "rparis6k")}


def test_find_shared_data(data_dir, monkeypatch, tmp_path):
    assert find_shared_data() == data_dir.resolve()
    monkeypatch.delenv("ISEARCH_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert find_shared_data() == data_dir.resolve()  # found from the package file
    monkeypatch.setenv("ISEARCH_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="ISEARCH_DATA"):
        find_shared_data()


def test_ukbench(benches, ukbench):
    b = benches["ukbench"]
    assert b.n_images == 1000 and b.n_queries == 1000 and len(set(b.groups.tolist())) == 250
    assert not b.comparable and "not comparable" in b.note
    assert b.query_indices == list(range(1000)) and all(box is None for box in b.query_boxes)
    rel = json.loads((ukbench / "relevant.json").read_text())
    names = [p.name for p in b.images]
    for i in (0, 5, 999):
        assert sorted(names[j] for j in b.gnd[i]["ok"]) == sorted(rel[names[i]])
    assert all(len(g["ok"]) == 4 and len(g["junk"]) == 0 for g in b.gnd)


def test_holidays(benches):
    b = benches["holidays"]
    assert b.n_images == 811 and b.n_queries == 300
    assert sum(len(g["ok"]) for g in b.gnd) == 511
    assert all(len(g["ok"]) >= 1 for g in b.gnd)
    for q, (qi, g) in enumerate(zip(b.query_indices, b.gnd)):
        assert b.images[qi] == b.query_paths[q] and list(g["junk"]) == [qi] and qi not in g["ok"]
    assert sum(p.suffix == ".png" for p in b.images) == 6
    assert load_holidays(b.images[0].parent.parent).n_images == 811  # root or root/jpg


def test_rparis_revisited(benches, paris):
    b = benches["rparis6k"]
    assert b.protocol == "revisited" and not b.comparable
    assert b.n_images == 238 and b.n_queries == 12
    assert [p.stem for p in b.query_paths] == RPARIS_QUERIES
    assert not set(p.stem for p in b.query_paths) & set(p.stem for p in b.images)  # queries not in database
    counts = {p: sum(len(g["ok"]) > 0 for g in ev.revisited_gnd(b.gnd, p)) for p in ev.PROTOCOLS}
    assert counts == {"easy": 12, "medium": 12, "hard": 11}  # paris_defense_000038 has no hard positive here
    for path, box in zip(b.query_paths, b.query_boxes):
        w, h = Image.open(path).size
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    # indices were remapped consistently with the pickle
    raw = load_gnd_pickle(find_shared_data() / "gnd/paris6k/gnd_rparis6k.pkl")
    q = raw["qimlist"].index("paris_eiffel_000266")
    present = {p.stem for p in paris.iterdir()}
    expected = sorted(raw["imlist"][i] for i in raw["gnd"][q]["easy"] if raw["imlist"][i] in present)
    assert sorted(b.images[i].stem for i in b.gnd[2]["easy"]) == expected and len(expected) == 24


def test_paris_classic(benches):
    b = benches["paris6k"]
    assert b.protocol == "classic" and b.n_images == 250 and b.n_queries == 12
    assert [p.stem for p in b.query_paths] == RPARIS_QUERIES
    for q, qi in enumerate(b.query_indices):
        assert qi is not None and b.images[qi] == b.query_paths[q]
        assert qi in b.gnd[q]["ok"]  # classic protocol: the query is one of its own positives
    assert all(box is not None for box in b.query_boxes)
    assert sorted(len(g["ok"]) for g in b.gnd) == [3, 32, 32, 34, 39, 39, 39, 39, 39, 39, 48, 48]


def test_oxford_needs_database(data_dir):
    for name in ("roxford5k", "oxford5k"):
        with pytest.raises(FileNotFoundError, match="images_dir|database"):
            load_benchmark(name)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("imagenet")


def test_oxford_query_boxes_inside_images(data_dir):
    raw = load_gnd_pickle(data_dir / "gnd/oxford5k/gnd_roxford5k.pkl")
    folder = data_dir / "oxford5k-queries10"
    files = sorted(folder.glob("*.jpg"))
    assert len(files) == 10
    for f in files:
        g = raw["gnd"][raw["qimlist"].index(f.stem)]
        w, h = Image.open(f).size
        x1, y1, x2, y2 = g["bbx"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def test_subset_of_a_folder(tmp_path, data_dir, paris):
    # a database made of 3 Eiffel images + the Eiffel query: gnd remapped onto the 3
    raw = load_gnd_pickle(data_dir / "gnd/paris6k/gnd_rparis6k.pkl")
    q = raw["qimlist"].index("paris_eiffel_000266")
    easy = [raw["imlist"][i] for i in raw["gnd"][q]["easy"] if (paris / f"{raw['imlist'][i]}.jpg").exists()][:2]
    other = "paris_defense_000000"
    (tmp_path / "jpg").mkdir()
    for n in easy + [other, "paris_eiffel_000266"]:
        (tmp_path / "jpg" / f"{n}.jpg").symlink_to(paris / f"{n}.jpg")
    b = load_revisited(tmp_path, data_dir / "gnd/paris6k/gnd_rparis6k.pkl")
    assert b.name == "rparis6k" and b.n_images == 3 and b.n_queries == 1
    assert sorted(b.images[i].stem for i in b.gnd[0]["easy"]) == sorted(easy)
    c = load_classic(tmp_path, data_dir / "gnd/gnd_paris6k.pkl")
    assert c.n_images == 4 and c.query_indices[0] is not None


def test_restricted_unpickler(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [Evil()]}))
    with pytest.raises(pickle.UnpicklingError):
        load_gnd_pickle(bad)
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["a"], "gnd": [{"ok": [0], "junk": [], "bbx": (0, 0, 1, 1)}]}))
    assert load_gnd_pickle(ok)["imlist"] == ["a"]


# ---------------------------------------------------------------------------------------------- evaluation sanity

@lru_cache(maxsize=None)
def expected_random_ap(R: int, N: int) -> float:
    """Exact E[AP] of a uniformly random ranking of N images, R of them positive (trapezoid rule):
    sum over the j-th positive at position r of P(j-th positive at r) * (p0 + p1) / (2R)."""
    total = 0.0
    for j in range(R):
        for r in range(j, N - R + j + 1):
            p = comb(r, j) * comb(N - r - 1, R - j - 1) / comb(N, R)
            p0 = 1.0 if r == 0 else j / r
            p1 = (j + 1) / (r + 1)
            total += p * (p0 + p1) / (2 * R)
    return total


def expected_random_map(b: Benchmark, protocol=None) -> float:
    out = []
    for g in b.ok_gnd(protocol):
        if len(g["ok"]):
            out.append(expected_random_ap(len(g["ok"]), b.n_images - len(np.setdiff1d(g["junk"], g["ok"]))))
    return float(np.mean(out))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ukbench", "holidays", "paris6k", "rparis6k"])
def test_perfect_reversed_random(benches, name):
    b = benches[name]
    perfect = b.perfect_ranks()
    res = b.evaluate(perfect)
    keys = [k for k in res if k.startswith("map")]
    assert keys and all(res[k] == pytest.approx(100.0) for k in keys)
    if name == "ukbench":
        assert res["ns"] == 4.0
    worst = b.evaluate(perfect[::-1].copy())
    assert all(worst[k] < 10.0 for k in keys)
    # scores give the same figures as their ranks
    rng = np.random.default_rng(0)
    scores = rng.random((b.n_queries, b.n_images))
    assert b.evaluate(scores) == b.evaluate(ev.ranks_from_scores(scores))
    # random rankings: mean over a few draws close to the exact expectation
    draws = [b.evaluate(rng.permutation(b.n_images * b.n_queries).reshape(b.n_queries, b.n_images).astype(float))
             for _ in range(20)]
    protos = {"map": None, "map_easy": "easy", "map_medium": "medium", "map_hard": "hard"}
    for k in keys:
        got = np.mean([d[k] for d in draws])
        exp = 100 * expected_random_map(b, protos[k])
        assert got == pytest.approx(exp, rel=0.15)  # AP is heavy-tailed; deterministic seed, (k, got, exp)


def test_evaluate_rejects_bad_shapes(benches):
    b = benches["rparis6k"]
    with pytest.raises(ValueError):
        b.evaluate(np.zeros((b.n_images, b.n_queries), dtype=np.float32))  # scores must be (nq, ndb)
    with pytest.raises(ValueError):
        b.evaluate(np.zeros((b.n_queries, b.n_images), dtype=np.int64))  # ranks must be (ndb, nq)
