"""io.py: the one .npz reader, model state files, prefetch and the progress bar."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from instance_search.errors import CorruptIndexError, FileFormatError, ISearchError
from instance_search.io import (atomic_save_npz, load_npz, prefetch, progress_bar, read_config, read_state,
                                save_state)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_load_npz_reads_every_array(tmp_path):
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.array(["x", "yz"])
    atomic_save_npz(tmp_path / "ok.npz", a=a, b=b)
    z = load_npz(tmp_path / "ok.npz")
    assert sorted(z) == ["a", "b"] and np.array_equal(z["a"], a) and np.array_equal(z["b"], b)


def test_load_npz_errors_name_the_file_and_never_unpickle(tmp_path):
    atomic_save_npz(tmp_path / "good.npz", a=np.zeros(1000))
    cases = {
        "missing.npz": None,
        "truncated.npz": (tmp_path / "good.npz").read_bytes()[:300],
        "garbage.npz": b"not a zip archive at all",
        "empty.npz": b"",
    }
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    marker = tmp_path / "pwned"
    np.savez(tmp_path / "pickled.npz", P=np.array([_Payload(marker)], dtype=object))
    np.save(tmp_path / "single.npy", np.zeros(3))
    for name in [*cases, "pickled.npz", "single.npy"]:
        with pytest.raises(FileFormatError, match=name) as e:
            load_npz(tmp_path / name, what="test file")
        assert "test file" in str(e.value)
        assert ("missing" in str(e.value)) == (name == "missing.npz")
    assert not marker.exists()
    with pytest.raises(CorruptIndexError, match="truncated.npz"):  # a caller's own package error
        load_npz(tmp_path / "truncated.npz", CorruptIndexError)
    data = (tmp_path / "good.npz").read_bytes()  # bytes (e.g. read from an index's fitted files)
    assert np.array_equal(load_npz(data, name="fitted/x.npz")["a"], np.zeros(1000))
    with pytest.raises(FileFormatError, match="fitted/x.npz: state corrupt"):
        load_npz(data[:300], what="state", name="fitted/x.npz")
    with pytest.raises(TypeError, match="name the file"):
        load_npz(data)
    with pytest.raises(TypeError, match="ISearchError"):
        load_npz(tmp_path / "good.npz", ValueError)


def test_model_state_round_trip_and_checks(tmp_path):
    net = torch.nn.Linear(3, 2)
    path = save_state(net, tmp_path / "m.pt", {"format": "test-model", "format_version": 1}, note="x")
    p, cfg, state = read_state(path, "test-model", FileFormatError, "test model")
    assert p == path and cfg["note"] == "x" and set(state) == {"weight", "bias"}
    assert torch.equal(state["weight"], net.weight.detach())
    with pytest.raises(FileFormatError, match="not a other config"):
        read_config(path, "other", FileFormatError, "other")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="sha256 differs"):
        read_state(path, "test-model", FileFormatError, "test model")
    cfg_path = path.with_suffix(".json")
    cfg_path.write_text(json.dumps(dict(cfg, format_version=9)))
    with pytest.raises(FileFormatError, match="newer than supported"):
        read_config(path, "test-model", FileFormatError, "test model")
    with pytest.raises(ValueError, match="give the .pt path"):
        save_state(net, tmp_path / "m.json", {})
    with pytest.raises(FileNotFoundError, match="config not found"):
        read_state(tmp_path / "none.pt", "test-model", FileFormatError, "test model")


def test_prefetch_keeps_order_overlaps_and_raises_in_turn():
    items = list(range(30)) + [None, 0]  # a None item does not end the map early
    active, peak, lock = [0], [0], threading.Lock()

    def slow(x):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01 if x is None else 0.002 * ((x or 0) % 3))
        with lock:
            active[0] -= 1
        return x

    assert list(prefetch(slow, items, ahead=4, workers=3)) == items
    assert peak[0] >= 2  # really ran ahead in threads

    def boom(x):
        if x == 5:
            raise KeyError("item 5")
        return x

    got = []
    with pytest.raises(KeyError, match="item 5"):
        for v in prefetch(boom, range(10)):
            got.append(v)
    assert got == [0, 1, 2, 3, 4]
    assert list(prefetch(boom, [])) == []
    with pytest.raises(ValueError, match="ahead"):
        list(prefetch(boom, [1], ahead=0))


def test_progress_bar_can_be_silent(capsys):
    bar = progress_bar(3, "work", enabled=False)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert capsys.readouterr().err == ""
    assert issubclass(FileFormatError, ISearchError)
