"""The one training / evaluation split used by everything that learns (issue: learned R-MAC, RPN, CS-SR).

Training collection: Holidays-811 (group = image id // 100, i.e. one scene per query id) plus UKBench
objects 0-124 (images 0-499, group = number // 4).  Evaluation: UKBench objects 125-249 (images 500-999,
every image a query) and the 250 Paris images with their query boxes.  The two never share an image;
:func:`assert_disjoint` checks it and every trainer calls it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .benchmarks import Benchmark, find_shared_data, load_benchmark

UKBENCH_TRAIN_IMAGES = range(0, 500)  # objects 0..124
UKBENCH_EVAL_IMAGES = range(500, 1000)  # objects 125..249
HOLIDAYS_GROUP_OFFSET = 1_000_000  # training labels: ukbench objects < 250, holidays id//100 + offset


@dataclass
class TrainingSet:
    """Images with a group label each (same label = same object / scene)."""

    paths: list[Path]
    labels: np.ndarray  # (N,) int64
    source: list[str]  # "holidays" | "ukbench" per image

    def __len__(self) -> int:
        return len(self.paths)

    def groups(self) -> dict[int, list[int]]:
        """label -> indices of its images (in order)."""
        out: dict[int, list[int]] = {}
        for i, g in enumerate(self.labels.tolist()):
            out.setdefault(int(g), []).append(i)
        return out

    def subset(self, idx) -> "TrainingSet":
        idx = [int(i) for i in idx]
        return TrainingSet([self.paths[i] for i in idx], self.labels[idx], [self.source[i] for i in idx])


def _data_dir(data_dir: str | os.PathLike | None) -> Path:
    d = Path(data_dir) if data_dir is not None else find_shared_data()
    if d is None or not Path(d).is_dir():
        raise FileNotFoundError(f"benchmark data folder not found: {data_dir!r} (expected ../shared/data)")
    return Path(d)


def _ukb_number(p: Path) -> int:
    return int(p.stem.lower().replace("ukbench", ""))


def training_set(data_dir: str | os.PathLike | None = None) -> TrainingSet:
    """Holidays-811 + UKBench images 0-499, labelled by group."""
    d = _data_dir(data_dir)
    hol = load_benchmark("holidays", d / "holidays811")
    ukb = load_benchmark("ukbench", d / "ukbench1000")
    paths, labels, source = [], [], []
    for p in hol.images:
        paths.append(Path(p))
        labels.append(HOLIDAYS_GROUP_OFFSET + int(Path(p).stem) // 100)
        source.append("holidays")
    for p in ukb.images:
        n = _ukb_number(Path(p))
        if n in UKBENCH_TRAIN_IMAGES:
            paths.append(Path(p))
            labels.append(n // 4)
            source.append("ukbench")
    ts = TrainingSet(paths, np.asarray(labels, dtype=np.int64), source)
    assert_disjoint(ts.paths, evaluation_paths(d))
    return ts


def ukbench_eval(data_dir: str | os.PathLike | None = None) -> Benchmark:
    """UKBench images 500-999 (objects 125-249) as a benchmark of its own: every image a query."""
    d = _data_dir(data_dir)
    full = load_benchmark("ukbench", d / "ukbench1000")
    keep = [i for i, p in enumerate(full.images) if _ukb_number(Path(p)) in UKBENCH_EVAL_IMAGES]
    if not keep:
        raise FileNotFoundError(f"no UKBench images 500-999 in {d / 'ukbench1000'}")
    paths = [full.images[i] for i in keep]
    groups = np.asarray(full.groups)[keep]
    gnd = [{"ok": np.flatnonzero(groups == groups[q]), "junk": np.empty(0, dtype=np.int64)}
           for q in range(len(paths))]
    return Benchmark(name="ukbench-eval", images=paths, query_paths=list(paths), query_boxes=[None] * len(paths),
                     gnd=gnd, protocol="ukbench", query_indices=list(range(len(paths))), groups=groups,
                     comparable=False, note="UKBench images 500-999 (evaluation half of the split)")


def paris_eval(data_dir: str | os.PathLike | None = None) -> Benchmark:
    """The 250 Paris images, revisited protocol, queries cropped to their boxes."""
    d = _data_dir(data_dir)
    return load_benchmark("rparis6k", d / "rparis250" / "jpg")


def evaluation_paths(data_dir: str | os.PathLike | None = None) -> list[Path]:
    d = _data_dir(data_dir)
    out = list(ukbench_eval(d).images)
    out += list(paris_eval(d).images)
    return [Path(p) for p in out]


def assert_disjoint(train_paths, eval_paths) -> None:
    """Raise if a training image is also an evaluation image (compared by resolved path and file name)."""
    tr = {Path(p).resolve() for p in train_paths}
    ev = {Path(p).resolve() for p in eval_paths}
    both = tr & ev
    if both:
        raise AssertionError(f"training and evaluation split overlap in {len(both)} images, e.g. {sorted(both)[:3]}")
    names_tr = {Path(p).name for p in train_paths}
    names_ev = {Path(p).name for p in eval_paths}
    if names_tr & names_ev:
        raise AssertionError(f"training and evaluation split share file names: {sorted(names_tr & names_ev)[:3]}")
