"""Region proposal network (nets/rpn.py): box maths and RoI pooling against slow loops, and real training on
UKBench training images with boxes from the automatic cleaning (train/cleaning.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from instance_search.nets import rpn as NR
from instance_search.ops import boxes as B
from instance_search.recipes import salvador as SV
from instance_search.train import rpn as TR

pytestmark = pytest.mark.slow  # its module fixture alone takes seconds (pytest --durations)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def vgg():
    from instance_search.backbones import load_backbone
    from instance_search.backbones.fast import use_engine

    return use_engine(load_backbone("vgg16"), "winograd")


@pytest.fixture(scope="module")
def real_samples(vgg, ukbench, data_dir):
    """UKBench training objects 0 and 1 (images 0-7): conv5_3 maps at 256 px and the boxes estimated by the
    cleaning (SIFT matching + box diffusion), in map-frame pixels."""
    from instance_search.eval.datasets.splits import TrainingSet
    from instance_search.images import load_image
    from instance_search.train.cleaning import CleaningParams, clean_and_box

    paths = [ukbench / f"ukbench{i:05d}.jpg" for i in range(8)]
    ts = TrainingSet(paths, np.array([i // 4 for i in range(8)]), ["ukbench"] * 8)
    res = clean_and_box(ts, root=data_dir, params=CleaningParams(max_side=320), progress=False)
    out = []
    for p in paths:
        rec = res.images[p.resolve().relative_to(data_dir.resolve()).as_posix()]
        if not rec["kept"]:
            continue
        img = load_image(p, max_size=256)
        fmap = vgg.features(img, layers=["conv5_3"], scales=(1.0,))[("conv5_3", 1.0)]
        assert fmap.ndim == 3
        box = B.to_map_frame(rec["box"], img.info["original_size"], tuple(fmap.shape[-2:]), 16)
        out.append(TR.RPNSample(fmap.float(), box, p.name))
    assert len(out) >= 6, "the cleaning should keep most of these UKBench views"
    return out


# ------------------------------------------------------------------------------------------------ box maths
def _slow_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _random_boxes(rng, n, size=300.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(4, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], 1)


def test_box_iou_matches_slow_loop():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 40), _random_boxes(rng, 30)
    got = B.box_iou(a, b).numpy()
    ref = np.array([[_slow_iou(x, y) for y in b] for x in a])
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert got.max() > 0.1 and (got == 0).any()


def test_encode_decode_round_trip_and_formula():
    rng = np.random.default_rng(1)
    anc = torch.from_numpy(_random_boxes(rng, 50))
    box = torch.from_numpy(_random_boxes(rng, 50))
    d = B.encode_boxes(anc, box)
    np.testing.assert_allclose(B.decode_boxes(anc, d).numpy(), box.numpy(), rtol=1e-9, atol=1e-9)
    a, b = anc[0].tolist(), box[0].tolist()  # Ren et al. 2015, Eq. 2, by hand
    wa, ha, wb, hb = a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1]
    ref = [((b[0] + wb / 2) - (a[0] + wa / 2)) / wa, ((b[1] + hb / 2) - (a[1] + ha / 2)) / ha, math.log(wb / wa),
           math.log(hb / ha)]
    np.testing.assert_allclose(d[0].numpy(), ref, rtol=1e-12)
    with pytest.raises(ValueError, match="positive width"):
        B.encode_boxes(anc[:1], torch.tensor([[5.0, 5.0, 5.0, 9.0]], dtype=torch.float64))


def test_anchors_layout():
    base = B.base_anchors((32, 64), (0.5, 1.0, 2.0))
    assert base.shape == (6, 4)
    w = base[:, 2] - base[:, 0]
    h = base[:, 3] - base[:, 1]
    np.testing.assert_allclose((w * h).numpy(), [32 ** 2, 64 ** 2] * 3, rtol=1e-5)
    np.testing.assert_allclose((h / w).numpy(), [0.5, 0.5, 1, 1, 2, 2], rtol=1e-5)
    A = B.grid_anchors(3, 5, 16, base)
    assert A.shape == (3 * 5 * 6, 4)
    # anchor of cell (row 2, column 4), anchor index 3, centred on ((4 + .5) 16, (2 + .5) 16)
    a = A[(2 * 5 + 4) * 6 + 3]
    assert torch.allclose((a[0] + a[2]) / 2, torch.tensor(72.0)) and torch.allclose((a[1] + a[3]) / 2, torch.tensor(40.0))


def _slow_nms(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = []
    for i in order:
        if all(_slow_iou(boxes[i], boxes[j]) <= thr for j in keep):
            keep.append(i)
    return keep


def test_nms_matches_slow_greedy_loop():
    rng = np.random.default_rng(2)
    boxes = _random_boxes(rng, 300, 200.0)
    scores = rng.uniform(size=300).round(2)  # ties on purpose
    for thr in (0.3, 0.5, 0.7):
        got = B.nms(boxes, scores, thr).tolist()
        assert got == _slow_nms(boxes.tolist(), scores.tolist(), thr)
        assert B.nms(boxes, scores, thr, max_keep=7).tolist() == got[:7]
    with pytest.raises(ValueError, match="3 scores"):
        B.nms(boxes, scores[:3])


def test_assign_anchors_follows_ren_rules():
    anchors = B.grid_anchors(6, 8, 16, B.base_anchors((32, 64), (0.5, 1, 2)))
    gt = torch.tensor([[10.0, 12.0, 70.0, 60.0], [60.0, 30.0, 120.0, 95.0]])
    labels, matched = B.assign_anchors(anchors, gt, 0.7, 0.3)
    iou = B.box_iou(anchors, gt).numpy()
    for i in range(len(anchors)):
        best = iou[i].max()
        is_argmax = any(iou[i, g] == iou[:, g].max() for g in range(2))
        want = 1 if (best >= 0.7 or is_argmax) else (0 if best < 0.3 else -1)
        assert labels[i] == want, i
        if want == 1 and not is_argmax:
            assert matched[i] == iou[i].argmax()
    s = TR.sample_labels(labels, 20, 0.5, torch.Generator().manual_seed(0))
    assert int((s >= 0).sum()) == 20 and int((s == 1).sum()) <= 10
    assert set(torch.nonzero(s == 1)[:, 0].tolist()) <= set(torch.nonzero(labels == 1)[:, 0].tolist())


# ------------------------------------------------------------------------------------------------ RoI pooling
def test_roi_pool_matches_caffe_on_a_real_map(real_samples):
    """The one RoI pooling (Caffe's rounding) against the transcription of Caffe's layer, on a real conv5_3 map."""
    from reference_caffe import caffe_roi_pool

    X = real_samples[0].map()[:24]
    H, W = X.shape[-2:]
    rng = np.random.default_rng(4)
    boxes = _random_boxes(rng, 25, 16.0 * min(H, W))
    boxes = np.concatenate([boxes, [[0, 0, W * 16, H * 16], [3, 3, 9, 9], [-20, -5, 400, 500]]])
    for p in (1, 3, 7):
        got = B.roi_pool(X, boxes, p)
        assert np.array_equal(got.numpy(), caffe_roi_pool(X.numpy(), boxes, p, p, 1 / 16)), p
    # 1x1 RoI pooling of a box is the MAC of the cells it covers (Gordo et al. 2016, Sec. 3.1)
    assert torch.equal(B.roi_pool(X, [[0, 0, W * 16, H * 16]], 1)[0, :, 0, 0], X.amax(dim=(1, 2)))
    # one projection of boxes onto cells: RoI pooling at 1x1 = region MACs (R-MAC, RPA) of boxes_to_cells
    from instance_search.ops.pooling import region_macs

    ext = B.roi_extent(boxes, 16)
    inside = (ext[:, 0] < W) & (ext[:, 1] < H)  # a box starting in the last half cell rounds past the map
    assert 0 < inside.sum() < len(boxes)
    cells = B.boxes_to_cells(boxes[inside], 16, H, W)
    assert torch.equal(B.roi_pool(X, boxes[inside], 1)[:, :, 0, 0], region_macs(X, cells))
    with pytest.raises(ValueError, match="outside the"):
        B.boxes_to_cells(boxes[~inside][:1], 16, H, W)


def test_bad_boxes_are_refused():
    X = torch.rand(4, 5, 6)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        B.roi_pool(X, [[1, 2, 3]])
    with pytest.raises(ValueError, match="finite"):
        B.roi_pool(X, [[0, 0, float("nan"), 5]])
    with pytest.raises(ValueError, match="one \\(C, H, W\\) map"):
        B.roi_pool(torch.rand(1, 4, 5, 6), [[0, 0, 5, 5]])


def test_detection_recall_by_hand():
    gt = [np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [20, 20, 30, 40]])]
    props = [np.array([[50, 50, 60, 60], [0, 0, 10, 12]]), np.array([[0, 0, 10, 10], [20, 20, 30, 30]])]
    rec = TR.detection_recall(props, gt, (0.5, 0.7), ks=(1, 2))
    assert rec["1"] == {"0.5": 1 / 3, "0.7": 1 / 3}  # only image 2's first proposal matches
    assert rec["2"] == {"0.5": 1.0, "0.7": 2 / 3}  # IoU 10/12 and 0.5 for the half-height box


# ------------------------------------------------------------------------------------------------ training
def _recall(rpn, samples, k=16, t=0.7):
    props = [rpn.propose(s.map(), k)[0] for s in samples]
    return TR.detection_recall(props, [s.boxes for s in samples], (t,))["all"][str(t)]


def test_training_on_real_boxes_lowers_the_loss_and_raises_recall(real_samples, tmp_path):
    torch.manual_seed(0)
    rpn = NR.RPN(mid_channels=64, sizes=(32, 64, 128, 256), max_size=256)
    cfg = TR.RPNTrainConfig(epochs=10, lr=3e-3, images_per_batch=1, seed=0)
    before = TR.evaluate_loss(rpn, real_samples, cfg)
    r_before = _recall(rpn, real_samples)
    hist = TR.train_rpn(rpn, real_samples, cfg, tmp_path / "ck", progress=False)
    after = TR.evaluate_loss(rpn, real_samples, cfg)
    r_after = _recall(rpn, real_samples)
    assert len(hist["epochs"]) == 10 and all(e["seconds"] > 0 for e in hist["epochs"])
    assert after["val_cls"] < 0.5 * before["val_cls"], (before, after)
    assert r_after > r_before and r_after >= 0.8, (r_before, r_after)
    assert sorted(p.name for p in (tmp_path / "ck").glob("epoch-*.pt"))[-1] == "epoch-010.pt"


def test_resume_from_checkpoint_gives_the_same_weights(real_samples, tmp_path):
    cfg = TR.RPNTrainConfig(epochs=2, lr=1e-3, images_per_batch=2, seed=3)

    def fresh():
        torch.manual_seed(1)
        return NR.RPN(mid_channels=32, sizes=(64, 128), max_size=256)

    straight = fresh()
    TR.train_rpn(straight, real_samples, cfg, tmp_path / "a", progress=False)

    class Stop(Exception):
        pass

    def stop(epoch, rec):
        raise Stop

    with pytest.raises(Stop):  # interrupted after the first epoch's checkpoint
        TR.train_rpn(fresh(), real_samples, cfg, tmp_path / "b", progress=False, on_epoch=stop)
    resumed = NR.RPN(mid_channels=32, sizes=(64, 128), max_size=256)  # other random weights: the checkpoint wins
    hist = TR.train_rpn(resumed, real_samples, cfg, tmp_path / "b", progress=False)
    assert [e["epoch"] for e in hist["epochs"]] == [1, 2]
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-7)
    other = TR.RPNTrainConfig(**{**vars(cfg), "lr": 2e-3})  # other settings: the checkpoint is not used
    h2 = TR.train_rpn(fresh(), real_samples, TR.RPNTrainConfig(**{**vars(other), "epochs": 1}), tmp_path / "b",
                     progress=False)
    assert len(h2["epochs"]) == 1 and h2["epochs"][0]["lr"] == 2e-3


def test_training_refuses_bad_samples(real_samples):
    bad = [TR.RPNSample(real_samples[0].fmap, np.array([[10.0, 10.0, 5.0, 20.0]]), "upside-down.jpg")]
    with pytest.raises(ValueError, match="upside-down.jpg"):
        TR.train_rpn(NR.RPN(mid_channels=8), bad, TR.RPNTrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match="no training samples"):
        TR.train_rpn(NR.RPN(mid_channels=8), [], progress=False)
    with pytest.raises(ValueError, match="epochs"):
        TR.RPNTrainConfig(epochs=0).validate()


def test_proposals_are_sorted_clipped_and_suppressed(real_samples):
    torch.manual_seed(0)
    rpn = NR.RPN(mid_channels=16)
    m = real_samples[0].map()
    H, W = m.shape[-2:]
    boxes, scores = rpn.propose(m, 50)
    assert len(boxes) == 50 and torch.all(scores[:-1] >= scores[1:])
    assert boxes.min() >= 0 and float(boxes[:, 2].max()) <= W * 16 and float(boxes[:, 3].max()) <= H * 16
    iou = B.box_iou(boxes, boxes) - torch.eye(50, dtype=torch.float64)
    assert float(iou.max()) <= 0.7 + 1e-6
    cells = rpn.proposal_cells(m, 50)
    assert cells.shape == (50, 4) and (cells[:, 0] + cells[:, 2] <= W).all() and (cells[:, 1] + cells[:, 3] <= H).all()


# ------------------------------------------------------------------------------------------------ files, recipe
def test_save_load_round_trip_and_damage(real_samples, tmp_path):
    torch.manual_seed(0)
    rpn = NR.RPN(mid_channels=16, sizes=(40, 80), ratios=(1.0,), max_size=256)
    path = NR.save_rpn(rpn, tmp_path / "m.pt", note="test")
    back, cfg = NR.load_rpn(path)
    assert cfg["note"] == "test" and back.sizes == (40.0, 80.0) and back.max_size == 256
    m = real_samples[0].map()
    assert torch.equal(back.propose(m, 20)[0], rpn.propose(m, 20)[0])
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(NR.RPNFileError, match="m.pt"):
        NR.load_rpn(path)
    (tmp_path / "x.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "x.pt").write_bytes(b"junk")
    with pytest.raises(NR.RPNFileError, match="x.json"):
        NR.load_rpn(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        NR.load_rpn(tmp_path / "nothing.pt")


def test_rpa_recipe_pools_rmac_over_the_proposals(real_samples, tmp_path):
    from instance_search.ops.pooling import region_macs
    from instance_search.recipes.base import Recipe

    torch.manual_seed(0)
    rpn = NR.RPN(mid_channels=16, max_size=256)
    path = NR.save_rpn(rpn, tmp_path / "rpn.pt")
    rec = SV.rpa_recipe(path, proposals=12, max_size=256)
    assert rec.name == "rpa" and rec.extra["proposals"] == 12
    m = real_samples[0].map()
    local = rec.local_from_map(m)
    ref = region_macs(m, rpn.proposal_cells(m, 12)).numpy()
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(local, ref, rtol=1e-5, atol=1e-6)
    g = rec.finalize(local)
    np.testing.assert_allclose(g, ref.sum(0) / np.linalg.norm(ref.sum(0)), rtol=1e-5, atol=1e-6)
    assert Recipe.from_dict(rec.to_dict()) == rec
    with pytest.raises(ValueError, match="region proposal network"):
        Recipe("rpa")
    ipa = Recipe("ipa", extra={"pooling": "sum"})
    np.testing.assert_allclose(ipa.local_from_map(m)[0], (m.sum((1, 2)) / m.sum((1, 2)).norm()).numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        Recipe("ipa", extra={"pooling": "mean"})


def test_rpa_recipe_indexes_and_searches_a_collection(tmp_path, ukbench):
    """The ``rpa`` recipe inside a real on-disk collection: index 8 UKBench photos, query with a third view."""
    from instance_search.collection import Collection

    torch.manual_seed(0)
    path = NR.save_rpn(NR.RPN(mid_channels=16, max_size=224), tmp_path / "rpn.pt")
    col = Collection.create(tmp_path / "index", SV.rpa_recipe(path, proposals=32, max_size=224), whitening="none")
    photos = [ukbench / f"ukbench{i:05d}.jpg" for i in (0, 1, 4, 5, 8, 9, 12, 13)]
    report = col.add_folder(photos, progress=False)
    assert len(report.added) == 8 and not report.failed
    hits = col.search(ukbench / "ukbench00006.jpg", top=2)  # object 1, a view that is not indexed
    assert {Path(h.path).name for h in hits} == {"ukbench00004.jpg", "ukbench00005.jpg"}


# ------------------------------------------------------------------------------------------------ slow references
def test_map_frame_round_trip_and_grid_boxes():
    b = np.array([[12.0, 30.0, 410.0, 250.0]])
    f = B.to_map_frame(b, (500, 333), (20, 31), 16)  # a 500 x 333 photo described as a 31 x 20 map
    np.testing.assert_allclose(f, [[12 * 496 / 500, 30 * 320 / 333, 410 * 496 / 500, 250 * 320 / 333]])
    np.testing.assert_allclose(B.from_map_frame(f, (500, 333), (20, 31), 16), b)
    from instance_search.ops.pooling import rmac_regions

    g = B.grid_boxes(20, 31, 3)
    for (x, y, w, h), box in zip(rmac_regions(20, 31, 3).tolist(), g.tolist()):
        assert box == [16 * x, 16 * y, 16 * (x + w), 16 * (y + h)]


def test_rpn_loss_matches_slow_loop_on_a_real_map(real_samples):
    torch.manual_seed(5)
    rpn = NR.RPN(mid_channels=16, sizes=(32, 64, 128, 256), max_size=256)
    s = real_samples[0]
    m = s.map()
    anchors = rpn.anchors(*m.shape[-2:])
    gt = torch.as_tensor(np.asarray(s.boxes, dtype=np.float32))
    with torch.no_grad():
        logits, deltas = rpn(m)
    labels, matched = B.assign_anchors(anchors, gt)
    labels = TR.sample_labels(labels, 64, 0.5, torch.Generator().manual_seed(0))
    cls, reg = TR.rpn_loss(logits, deltas, anchors, gt, labels, matched, 1 / 9)
    n, c_ref, r_ref = 0, 0.0, 0.0
    for i in range(len(anchors)):  # Ren et al. 2015, Eq. 1, one anchor at a time
        if labels[i] < 0:
            continue
        n += 1
        p = 1 / (1 + math.exp(-float(logits[i])))
        c_ref -= math.log(p) if labels[i] == 1 else math.log(1 - p)
        if labels[i] == 1:
            a, b = anchors[i].tolist(), gt[matched[i]].tolist()
            wa, ha, wb, hb = a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1]
            t = [((b[0] + b[2]) - (a[0] + a[2])) / 2 / wa, ((b[1] + b[3]) - (a[1] + a[3])) / 2 / ha,
                 math.log(wb / wa), math.log(hb / ha)]
            for d, tt in zip(deltas[i].tolist(), t):
                x = abs(d - tt)
                r_ref += 0.5 * x * x * 9 if x < 1 / 9 else x - 0.5 / 9
    assert n == 64 and int((labels == 1).sum()) >= 1
    assert float(cls) == pytest.approx(c_ref / n, rel=1e-5)
    assert float(reg) == pytest.approx(r_ref / n, rel=1e-4)


def test_propose_matches_a_slow_pipeline(real_samples):
    torch.manual_seed(6)
    rpn = NR.RPN(mid_channels=16, sizes=(32, 64, 128), max_size=256).eval()
    with torch.no_grad():
        torch.nn.init.normal_(rpn.head.reg.weight, std=0.02)  # non-trivial deltas
    m = real_samples[2].map()
    H, W = m.shape[-2:]
    boxes, scores = rpn.propose(m, 30, pre_nms=200, nms_iou=0.6)
    with torch.no_grad():
        logits, deltas = rpn(m)
    anchors = rpn.anchors(H, W)
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))[:200]
    cand, cs = [], []
    for i in order:  # Ren et al. 2015, Eq. 2 inverted, clipped, boxes under one stride dropped
        a, d = anchors[i].tolist(), deltas[i].tolist()
        wa, ha = a[2] - a[0], a[3] - a[1]
        cx, cy = a[0] + wa / 2 + d[0] * wa, a[1] + ha / 2 + d[1] * ha
        w, h = wa * math.exp(d[2]), ha * math.exp(d[3])
        b = [min(max(cx - w / 2, 0), W * 16), min(max(cy - h / 2, 0), H * 16), min(max(cx + w / 2, 0), W * 16),
             min(max(cy + h / 2, 0), H * 16)]
        if b[2] - b[0] >= 16 and b[3] - b[1] >= 16:
            cand.append(b)
            cs.append(1 / (1 + math.exp(-float(logits[i]))))
    keep = _slow_nms(cand, cs, 0.6)[:30]
    np.testing.assert_allclose(boxes.numpy(), np.array(cand)[keep], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(scores.numpy(), np.array(cs)[keep], rtol=1e-5)
