"""The training / evaluation split (Holidays + UKBench 0-499 vs UKBench 500-999 + Paris-250)."""
import numpy as np
import pytest

from instance_search.eval.datasets import splits


def test_split_sizes_and_disjoint(data_dir):
    ts = splits.training_set(data_dir)
    ev = splits.ukbench_eval(data_dir)
    assert len(ts) == 811 + 500
    assert ts.source.count("ukbench") == 500
    assert ev.n_images == 500 and ev.n_queries == 500
    # every training group of UKBench has its 4 views, labels of the two sources never collide
    g = ts.groups()
    ukb = [lab for lab in g if lab < splits.HOLIDAYS_GROUP_OFFSET]
    assert len(ukb) == 125 and all(len(g[lab]) == 4 for lab in ukb)
    assert set(np.asarray(ev.groups).tolist()) == set(range(125, 250))
    splits.assert_disjoint(ts.paths, splits.evaluation_paths(data_dir))
    # a perfect ranking on the evaluation half scores 4.0
    assert ev.evaluate(ev.perfect_ranks())["ns"] == pytest.approx(4.0)


def test_assert_disjoint_catches_overlap(data_dir):
    ts = splits.training_set(data_dir)
    with pytest.raises(AssertionError, match="overlap"):
        splits.assert_disjoint(ts.paths, ts.paths[:3])
