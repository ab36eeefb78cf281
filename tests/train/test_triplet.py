"""Triplet ranking loss, hard-negative mining and the trainer of learned R-MAC (Gordo et al. 2016, Sec. 3.1)."""
import json

import numpy as np
import pytest
import torch

from instance_search.eval.datasets import splits
from instance_search.nets import rmac_head as rn
from instance_search.train import triplet as tr

pytestmark = pytest.mark.slow  # its module fixture alone takes seconds (pytest --durations)

SIZE = 160  # tiny images: pool4 maps of 10 x 7 cells, so a few epochs take seconds


def test_loss_by_hand():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]], requires_grad=True)
    p = torch.tensor([[0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
    n = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    loss = tr.triplet_loss(q, p, n, margin=0.1)
    # 1/2 max(0, m + |q-p|^2 - |q-n|^2):  |q-p|^2 = 2, 0.4, 0;  |q-n|^2 = 0.4, 0.8, 0.4
    want = [0.5 * (0.1 + 2.0 - 0.4), 0.0, 0.0]
    assert loss.tolist() == pytest.approx(want, abs=1e-6)
    assert tr.triplet_loss(q, p, n, margin=0.5).tolist() == pytest.approx([1.05, 0.05, 0.05], abs=1e-6)
    loss.sum().backward()
    # d/dq of 1/2 (m + |q-p|^2 - |q-n|^2) = n - p where the triplet is active, 0 elsewhere
    assert q.grad[0].tolist() == pytest.approx((n[0] - p[0]).tolist(), abs=1e-6)
    assert q.grad[1].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="shapes differ"):
        tr.triplet_loss(q, p[:2], n)


def _brute_negatives(sim, ql, pl, k, one_per_label):
    out = []
    for a in range(len(ql)):
        chosen, used = [], set()
        while len(chosen) < k:
            best, best_s = -1, -np.inf
            for j in range(len(pl)):
                if pl[j] == ql[a] or j in chosen or (one_per_label and pl[j] in used):
                    continue
                if sim[a, j] > best_s:
                    best, best_s = j, sim[a, j]
            if best < 0:
                break
            chosen.append(best)
            used.add(pl[best])
        out.append(chosen + [-1] * (k - len(chosen)))
    return np.asarray(out)


def test_hardest_negatives_vs_brute_force():
    rng = np.random.default_rng(3)
    sim = rng.standard_normal((15, 60))
    pl = rng.integers(0, 8, 60)
    ql = rng.integers(0, 8, 15)
    for k in (1, 3, 9):
        for one in (True, False):
            got = tr.hardest_negatives(sim, ql, pl, k=k, one_per_label=one)
            assert np.array_equal(got, _brute_negatives(sim, ql, pl, k, one)), (k, one)
    with pytest.raises(ValueError, match="does not match"):
        tr.hardest_negatives(sim[:, :5], ql, pl)


@pytest.fixture(scope="module")
def tiny(data_dir, tmp_path_factory):
    """A tiny real subset of the training split: UKBench objects 0-5 and 4 Holidays scenes, pool4 cached."""
    from instance_search.backbones import load_backbone

    ts = splits.training_set(data_dir)
    hol = sorted({int(x) for x, s in zip(ts.labels, ts.source) if s == "holidays"})[:4]
    keep = [i for i, (lab, s) in enumerate(zip(ts.labels, ts.source))
            if (s == "ukbench" and lab < 6) or (s == "holidays" and lab in hol)]
    sub = ts.subset(keep)
    bb = load_backbone("vgg16", progress=False)
    root = tmp_path_factory.mktemp("inputs")
    cache = tr.InputCache.build([(p, None) for p in sub.paths], bb, "pool4", SIZE, root, progress=False)
    return bb, sub, cache, root


def _net(bb, cache):
    net = rn.RMACNet("conv5").init_from_backbone(bb)
    rn.fit_head_whitening(net, cache, progress=False)
    return net


def test_input_cache_is_reused_and_faithful(tiny):
    bb, sub, cache, root = tiny
    assert len(cache) == len(sub) and cache[0].dtype == torch.float32 and cache[0].shape[0] == 512
    mtimes = [cache.file(i).stat().st_mtime_ns for i in range(len(cache))]
    again = tr.InputCache.build([(p, None) for p in sub.paths], bb, "pool4", SIZE, root, progress=False)
    assert again.folder == cache.folder
    assert [again.file(i).stat().st_mtime_ns for i in range(len(cache))] == mtimes  # nothing recomputed
    from instance_search.images import load_image

    ref = bb.features(load_image(sub.paths[5], max_size=SIZE), layers=["pool4"])[("pool4", 1.0)]
    assert torch.allclose(cache[5], ref, rtol=2e-3, atol=1e-2)  # fp16 storage


def test_mining_picks_the_hardest(tiny):
    bb, sub, cache, _ = tiny
    cfg = tr.TrainConfig(negatives=2, positive="hardest", skip_easy=False)
    trainer = tr.TripletTrainer(_net(bb, cache), cache, sub.labels, cfg, progress=False)
    anchors = trainer.anchors[::3]
    triplets, losses, stats = trainer.mine(anchors, np.random.default_rng(0))
    D = trainer.describe(range(len(sub))).numpy()
    sim = D @ D.T
    assert stats["pool"] == len(sub) and len(triplets) == 2 * len(anchors)
    for k, a in enumerate(anchors):  # brute force over every image of the training subset
        lab = sub.labels
        neg = [j for j in np.argsort(-sim[a], kind="stable") if lab[j] != lab[a]]
        first_per_group = [j for i, j in enumerate(neg) if lab[j] not in {lab[x] for x in neg[:i]}]
        pos = [j for j in range(len(sub)) if lab[j] == lab[a] and j != a]
        hardest_pos = pos[int(np.argmin(sim[a, pos]))]
        assert triplets[2 * k].tolist() == [a, hardest_pos, first_per_group[0]]
        assert triplets[2 * k + 1].tolist() == [a, hardest_pos, first_per_group[1]]
        want = 0.5 * max(0.0, 0.1 + 2 - 2 * sim[a, hardest_pos] - (2 - 2 * sim[a, first_per_group[0]]))
        assert losses[2 * k] == pytest.approx(want, abs=1e-5)


def test_training_reduces_the_loss(tiny):
    bb, sub, cache, _ = tiny
    torch.manual_seed(0)
    cfg = tr.TrainConfig(epochs=2, lr=0.01, batch=8, micro_batch=8, remine_every=2, skip_easy=False)
    trainer = tr.TripletTrainer(_net(bb, cache), cache, sub.labels, cfg, progress=False)
    fixed, _, _ = trainer.mine(trainer.anchors, np.random.default_rng(1))
    before = trainer.mean_loss(fixed)
    hist = trainer.fit(resume=False)
    after = trainer.mean_loss(fixed)
    assert len(hist["epochs"]) == 2 and hist["updates"]
    assert before > 0.01
    assert after < 0.5 * before, (before, after)
    # the hard triplets found with the trained weights violate the margin less than those found at the start
    assert hist["epochs"][1]["mean_mined_loss"] < 0.5 * hist["epochs"][0]["mean_mined_loss"]


def test_resume_continues_from_the_checkpoint(tiny, tmp_path):
    bb, sub, cache, _ = tiny
    cfg = dict(lr=0.01, batch=6, micro_batch=4, remine_every=1, anchors_per_epoch=12, mine_pool=8, seed=5)

    straight = tr.TripletTrainer(_net(bb, cache), cache, sub.labels, tr.TrainConfig(epochs=2, **cfg),
                                 tmp_path / "a", progress=False)
    straight.fit(resume=False)

    first = tr.TripletTrainer(_net(bb, cache), cache, sub.labels, tr.TrainConfig(epochs=1, **cfg),
                              tmp_path / "b", progress=False)
    first.fit(resume=False)
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["round"] == 0
    second = tr.TripletTrainer(rn.RMACNet("conv5"), cache, sub.labels, tr.TrainConfig(epochs=2, **cfg),
                               tmp_path / "b", progress=False)
    second.fit(resume=True)  # epoch 2 only, from the checkpoint's weights, momentum and position
    assert second.updates == straight.updates
    assert [u["loss"] for u in second.history["updates"]] == pytest.approx(
        [u["loss"] for u in straight.history["updates"]], abs=1e-6)
    for (k, a), b in zip(straight.net.state_dict().items(), second.net.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k

    # files: per-epoch models, the final model (state dict + JSON), the loss curve
    for d in ("a", "b"):
        assert (tmp_path / d / "epoch-002.pt").is_file() and (tmp_path / d / "loss_curve.png").stat().st_size > 5000
    net, cfg_json = rn.load_model(tmp_path / "b" / "model.pt")
    assert cfg_json["training"]["epochs_done"] == 2 and len(cfg_json["training"]["seconds_per_epoch"]) == 2
    # killed in the middle of an epoch: the checkpoint of the last finished round is resumed exactly
    killed = tr.TripletTrainer(_net(bb, cache), cache, sub.labels, tr.TrainConfig(epochs=1, **cfg), tmp_path / "c",
                               progress=False)
    real_mine, calls = killed.mine, []

    def mine_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_mine(*args, **kwargs)

    killed.mine = mine_then_die
    with pytest.raises(KeyboardInterrupt):
        killed.fit(resume=False)
    ck = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["round"]) == (0, 1)
    resumed = tr.TripletTrainer(rn.RMACNet("conv5"), cache, sub.labels, tr.TrainConfig(epochs=1, **cfg),
                                tmp_path / "c", progress=False)
    resumed.fit(resume=True)
    after_one, _ = rn.load_model(tmp_path / "a" / "epoch-001.pt")
    for (k, a), b in zip(after_one.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    with pytest.raises(tr.CheckpointError, match="other training settings"):
        tr.TripletTrainer(rn.RMACNet("conv5"), cache, sub.labels, tr.TrainConfig(epochs=3, **{**cfg, "lr": 0.5}),
                          tmp_path / "b", progress=False).fit(resume=True)


def test_bad_settings_are_refused(tiny):
    bb, sub, cache, _ = tiny
    with pytest.raises(ValueError, match="micro_batch"):
        tr.TrainConfig(micro_batch=0).validate()
    with pytest.raises(ValueError, match="labels"):
        tr.TripletTrainer(rn.RMACNet("conv5"), cache, sub.labels[:3])
    with pytest.raises(ValueError, match="positive"):
        tr.TripletTrainer(rn.RMACNet("conv5"), cache, np.arange(len(sub)))


def test_train_rmac_command_refuses_bad_options(tmp_path):
    from typer.testing import CliRunner

    from instance_search.cli.main import app

    for opts, msg in ((["--train-layers", "conv9"], "unknown train_layers"), (["--micro-batch", "0"], "micro_batch"),
                      (["--lr", "-1"], "lr must be")):
        res = CliRunner().invoke(app, ["train-rmac", "--checkpoint-dir", str(tmp_path), *opts])
        assert res.exit_code != 0 and msg in res.output, res.output
