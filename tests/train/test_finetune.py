"""Query-instance detector (train/detector.py): RoI sampling and the Fast R-CNN loss against hand computations,
and fine-tuning strategies #1 / #2 (Salvador et al. 2016, Sec. 3.2) on real UKBench photos."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from instance_search.nets import detector as ND
from instance_search.nets import rpn as NR
from instance_search.ops import boxes as B
from instance_search.train import detector as FT

pytestmark = pytest.mark.slow  # its module fixture alone takes seconds (pytest --durations)

torch.set_num_threads(1)
SIZE = 224


@pytest.fixture(scope="module")
def maps(ukbench):
    """pool4 and conv5_3 maps of UKBench objects 0 and 1 (images 0-7; view 0 of each also flipped)."""
    from instance_search.backbones import load_backbone
    from instance_search.backbones.fast import use_engine
    from instance_search.images import load_image

    bb = use_engine(load_backbone("vgg16"), "winograd")
    trunk = ND.conv5_block(bb).eval()
    out = {}
    for i in range(8):
        img = load_image(ukbench / f"ukbench{i:05d}.jpg", max_size=SIZE)
        imgs = {"": img, "_flip": img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)} if i % 4 == 0 else {"": img}
        for tag, im in imgs.items():
            p4 = bb.features(im, layers=["pool4"])[("pool4", 1.0)]
            with torch.no_grad():
                out[f"{i}{tag}"] = (p4, trunk(p4[None])[0])
    return bb, trunk, out


def _rpn():
    torch.manual_seed(0)
    return NR.RPN(mid_channels=32, sizes=(48, 96, 192), max_size=SIZE)


def _queries(maps):
    """Query samples: view 0 of objects 0 and 1 (classes 1, 2), whole image as the box, plus flips."""
    _, _, m = maps
    qs = []
    for obj in (0, 1):
        p4, c5 = m[f"{4 * obj}"]
        p4f, c5f = m[f"{4 * obj}_flip"]
        H, W = c5.shape[-2:]
        qs.append({"name": f"ukbench{4 * obj:05d}", "label": obj + 1, "box": [0, 0, W * 16, H * 16],
                   "pool4": p4, "conv5": c5, "pool4_flip": p4f, "conv5_flip": c5f})
    return FT.query_samples(qs)


def test_flip_boxes_and_query_samples(maps):
    np.testing.assert_array_equal(B.flip_boxes([[10, 5, 50, 40]], 100), [[50, 5, 90, 40]])
    samples = _queries(maps)
    assert [s.name for s in samples] == ["ukbench00000", "ukbench00000 (flipped)", "ukbench00004",
                                         "ukbench00004 (flipped)"]
    assert [int(s.labels[0]) for s in samples] == [1, 1, 2, 2]
    p4, p4f = samples[0].pool4, samples[1].pool4
    assert p4.shape == p4f.shape


def _slow_sample_check(rois, labels, matched, gt, gt_labels, fg_iou):
    iou = B.box_iou(rois, gt).numpy()
    for r in range(len(rois)):
        if labels[r] > 0:
            assert iou[r].max() >= fg_iou and labels[r] == gt_labels[iou[r].argmax()] and matched[r] == iou[r].argmax()
        else:
            assert iou[r].max() < fg_iou


def test_sample_rois_follows_fast_rcnn_rules():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (300, 2))
    props = torch.from_numpy(np.concatenate([xy, xy + rng.uniform(10, 120, (300, 2))], 1)).float()
    gt = torch.tensor([[20.0, 30.0, 120.0, 150.0], [100.0, 40.0, 220.0, 100.0]])
    gl = torch.tensor([3, 1])
    rois, labels, matched = FT.sample_rois(props, gt, gl, 64, 0.25, 0.5, 0.0, torch.Generator().manual_seed(0))
    assert len(rois) == 64 and 1 <= int((labels > 0).sum()) <= 16
    _slow_sample_check(rois, labels, matched, gt, gl, 0.5)
    # the ground-truth boxes are candidates: with no proposals at all, they are the foreground
    rois, labels, _ = FT.sample_rois(props[:0], gt, gl, 8)
    assert sorted(labels.tolist()) == [1, 3]


def test_detector_loss_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    deltas = torch.randn(4, 3, 4)
    rois = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 30], [0, 0, 50, 50], [1, 1, 3, 3]])
    gt = torch.tensor([[0.0, 0, 12, 11], [4, 6, 22, 28]])
    labels = torch.tensor([2, 1, 0, 0])
    matched = torch.tensor([0, 1, 0, 0])
    cls, reg = FT.detector_loss(logits, deltas, rois, labels, gt, matched)
    ref_cls = -sum(torch.log_softmax(logits[i], 0)[labels[i]] for i in range(4)) / 4
    ref_reg = 0.0
    for i in (0, 1):
        t = B.encode_boxes(rois[i:i + 1], gt[matched[i]:matched[i] + 1])[0] / torch.tensor(ND.BBOX_STDS)
        d = deltas[i, labels[i]] - t
        ref_reg += sum(float(0.5 * x * x if abs(x) < 1 else abs(x) - 0.5) for x in d)
    assert float(cls) == pytest.approx(float(ref_cls), rel=1e-6)
    assert float(reg) == pytest.approx(ref_reg / 4, rel=1e-5)


def _state(mod):
    return {k: v.clone() for k, v in mod.state_dict().items()}


def test_strategy_1_trains_only_the_fc_layers_and_recognises_other_views(maps, tmp_path):
    bb, trunk, m = maps
    det = ND.Detector(_rpn(), 2, ["object 0", "object 1"], pool=3, hidden=256, trunk=ND.conv5_block(bb))
    t0, r0, h0 = _state(det.trunk), _state(det.rpn), _state(det.head)
    samples = _queries(maps)
    cfg = FT.DetectorTrainConfig(trainable="fc", iterations=40, lr=2e-3, images_per_batch=2, rois_per_image=32)
    props = [det.rpn.propose(s.conv5, 300)[0] for s in samples]
    hist = FT.train_detector(det, samples, cfg, tmp_path, progress=False, desc="s1", fixed_proposals=props)
    assert all(torch.equal(v, det.trunk.state_dict()[k]) for k, v in t0.items())
    assert all(torch.equal(v, det.rpn.state_dict()[k]) for k, v in r0.items())
    assert any(not torch.equal(v, det.head.state_dict()[k]) for k, v in h0.items())
    first, last = hist["epochs"][0]["train_cls"], hist["epochs"][-1]["train_cls"]
    assert last < 0.5 * first, (first, last)
    # views 1-3 of each object were never seen: the detector should prefer the right class
    right = 0
    for obj in (0, 1):
        for v in (1, 2, 3):
            scores, boxes = ND.class_detections(det, m[f"{4 * obj + v}"][1], proposals=100)
            assert scores.shape == (2,) and boxes.shape == (2, 4)
            right += int(np.argmax(scores) == obj)
    assert right >= 5, right
    # same settings and starting weights: the saved result is reused, not trained again
    det2 = ND.Detector(_rpn(), 2, ["object 0", "object 1"], pool=3, hidden=256, trunk=ND.conv5_block(bb))
    det2.head.load_state_dict(h0)
    hist2 = FT.train_detector(det2, samples, cfg, tmp_path, progress=False, desc="s1", fixed_proposals=props)
    assert hist2 == hist
    assert all(torch.equal(v, det.state_dict()[k]) for k, v in det2.state_dict().items())


def test_strategy_2_also_trains_conv5_and_the_rpn(maps):
    bb, trunk, m = maps
    det = ND.Detector(_rpn(), 2, ["a", "b"], pool=2, hidden=64, trunk=ND.conv5_block(bb))
    t0, r0 = _state(det.trunk), _state(det.rpn)
    cfg = FT.DetectorTrainConfig(trainable="conv5+rpn+fc", iterations=3, lr=1e-3, images_per_batch=2,
                                 rois_per_image=16, train_proposals=50)
    hist = FT.train_detector(det, _queries(maps), cfg, progress=False)
    assert any(not torch.equal(v, det.trunk.state_dict()[k]) for k, v in t0.items())
    assert any(not torch.equal(v, det.rpn.state_dict()[k]) for k, v in r0.items())
    assert "train_rpn_cls" in hist["epochs"][0]
    assert not any(p.requires_grad for p in det.parameters())
    with pytest.raises(ValueError, match="pool4"):  # conv5 cannot train without its input
        s = _queries(maps)[0]
        FT.train_detector(det, [FT.DetectorSample(s.boxes, s.labels, None, s.conv5, "no-pool4.jpg")], cfg,
                          progress=False)


def test_bad_labels_and_files(maps, tmp_path):
    bb, _, m = maps
    det = ND.Detector(_rpn(), 2, ["a", "b"], pool=2, hidden=32)
    s = _queries(maps)[0]
    bad = FT.DetectorSample(s.boxes, np.array([3]), s.pool4, s.conv5, "third-class.jpg")
    with pytest.raises(ValueError, match="third-class.jpg"):
        FT.train_detector(det, [bad], FT.DetectorTrainConfig(iterations=1), progress=False)
    with pytest.raises(ValueError, match="trainable"):
        FT.DetectorTrainConfig(trainable="everything").validate()
    with pytest.raises(ValueError, match="new_layer_lr_mult"):
        FT.DetectorTrainConfig(new_layer_lr_mult=0).validate()
    path = ND.save_detector(det, tmp_path / "det.pt", note="x")
    back, cfg = ND.load_detector(path)
    assert cfg["classes"] == ["a", "b"] and cfg["note"] == "x"
    c5 = m["1"][1]
    a, b = ND.class_detections(det, c5, 30), ND.class_detections(back, c5, 30)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ND.DetectorFileError, match="det.pt"):
        ND.load_detector(path)


def test_detect_and_class_detections_match_a_slow_forward(maps):
    """Detector.detect (Girshick 2015, Sec. 2: RoI pooling -> fc6 -> fc7 -> softmax, class boxes decoded with the
    (0.1, 0.1, 0.2, 0.2) target scaling) against a per-RoI computation, on a real conv5_3 map."""
    import math

    bb, _, m = maps
    torch.manual_seed(3)
    det = ND.Detector(_rpn(), 3, ["a", "b", "c"], pool=2, hidden=48).eval()
    with torch.no_grad():
        torch.nn.init.normal_(det.head.bbox_pred.weight, std=0.05)
        torch.nn.init.normal_(det.head.cls_score.weight, std=0.2)
    c5 = m["5"][1]
    H, W = c5.shape[-2:]
    props, probs, boxes = det.detect(c5, 40)
    assert torch.equal(props, det.rpn.propose(c5, 40)[0])
    h = det.head
    with torch.no_grad():
        for r, b in enumerate(props.tolist()):
            x = B.roi_pool(c5, [b], 2).flatten()
            x = x / x.norm() * math.sqrt(x.numel())
            z = torch.relu(h.fc7.weight @ torch.relu(h.fc6.weight @ x + h.fc6.bias) + h.fc7.bias)
            p = torch.softmax(h.cls_score.weight @ z + h.cls_score.bias, 0)
            torch.testing.assert_close(probs[r], p, rtol=1e-4, atol=1e-6)
            d = (h.bbox_pred.weight @ z + h.bbox_pred.bias).reshape(4, 4)
            for k in range(4):
                wa, ha = b[2] - b[0], b[3] - b[1]
                cx, cy = b[0] + wa / 2 + 0.1 * float(d[k, 0]) * wa, b[1] + ha / 2 + 0.1 * float(d[k, 1]) * ha
                w, hh = wa * math.exp(0.2 * float(d[k, 2])), ha * math.exp(0.2 * float(d[k, 3]))
                ref = [min(max(v, 0), lim) for v, lim in ((cx - w / 2, W * 16), (cy - hh / 2, H * 16),
                                                           (cx + w / 2, W * 16), (cy + hh / 2, H * 16))]
                np.testing.assert_allclose(boxes[r, k].numpy(), ref, rtol=1e-4, atol=1e-3)
    scores, cboxes = ND.class_detections(det, c5, 40, box="regressed")
    sp, pboxes = ND.class_detections(det, c5, 40)  # the authors' default: the raw proposal
    for k in range(3):
        j = int(torch.argmax(probs[:, k + 1]))
        assert scores[k] == pytest.approx(float(probs[j, k + 1]), rel=1e-6) and sp[k] == scores[k]
        np.testing.assert_allclose(cboxes[k], boxes[j, k + 1].numpy(), rtol=1e-6)
        np.testing.assert_array_equal(pboxes[k], props[j].numpy())
