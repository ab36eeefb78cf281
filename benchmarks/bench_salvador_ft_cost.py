"""What CS-SR fine-tuning strategy #2 costs on this machine's CPU when it trains the layers Salvador et al. 2016
name (Sec. 3.2: "all layers after the first two conv layers"; read as Faster R-CNN's VGG16 recipe: conv1 and
conv2 frozen, conv3_1 .. conv5_3 + RPN + FC trained) against what the package trains (#2: conv5_1..conv5_3 + RPN +
FC from pool4 maps; #1: the FC layers on fixed conv5_3 maps).

One SGD step per image = forward + backward of the trainable part (random weights: the cost does not depend on
them) on a map of the size a 384 px image gives (the bench's and demo's scale): pool2 96x72x128, pool4 24x18x512,
conv5_3 24x18x512; 64 RoIs, 3x3 RoI pooling, fc 1024 (the bench's head). One thread, as the benchmarks run.
Prints seconds per image per strategy and the cost of the bench's phase 2 (4 passes over 24 Paris / 250 UKBench
training images). Not run in CI.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_salvador_ft_cost.py --images 3
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections import OrderedDict  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from instance_search.backbones.vgg16 import VGG16  # noqa: E402
from instance_search.nets.detector import Detector  # noqa: E402
from instance_search.nets.rpn import RPN  # noqa: E402


def block(first: str, last: str = "relu5_3") -> nn.Sequential:
    """VGG16's layers from ``first`` to ``last`` (inclusive)."""
    vgg = VGG16()
    order = list(vgg._order)
    children = dict(vgg.features.named_children())
    return nn.Sequential(OrderedDict((n, children[n]) for n in order[order.index(first):order.index(last) + 1]))


def step(det: Detector, trunk: nn.Module | None, x: torch.Tensor, train_conv: bool) -> None:
    fmap = trunk(x[None])[0] if trunk is not None else x
    logits, deltas = det.rpn(fmap)
    H, W = fmap.shape[-2:]
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(64, 2, generator=g) * torch.tensor([W * 16.0, H * 16.0]) * 0.6
    rois = torch.cat([xy, xy + 48 + torch.rand(64, 2, generator=g) * 150], 1)
    cls, reg = det.head(fmap, rois)
    loss = F.cross_entropy(cls, torch.randint(0, cls.shape[1], (64,), generator=g)) + reg.pow(2).mean()
    if train_conv:
        loss = loss + F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits)) + deltas.pow(2).mean()
    loss.backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--height", type=int, default=288)
    ap.add_argument("--width", type=int, default=384)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    h4, w4 = args.height // 4, args.width // 4
    h16, w16 = args.height // 16, args.width // 16
    setups = {
        "#1 (FC on fixed conv5_3)": (None, torch.relu(torch.randn(512, h16, w16)), False),
        "#2 here (conv5_1..5_3 + RPN + FC, from pool4)":
            (block("conv5_1"), torch.relu(torch.randn(512, h16, w16)), True),
        "#2 paper (conv3_1..5_3 + RPN + FC, from pool2)":
            (block("conv3_1"), torch.relu(torch.randn(128, h4, w4)), True),
    }
    out = {}
    for name, (trunk, x, conv) in setups.items():
        det = Detector(RPN(), 5, pool=3, hidden=1024)
        det.train()
        for p in det.rpn.parameters():
            p.requires_grad_(conv)
        step(det, trunk, x, conv)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.images):
            det.zero_grad(set_to_none=True)
            if trunk is not None:
                trunk.zero_grad(set_to_none=True)
            step(det, trunk, x, conv)
        wall, cpu = (time.perf_counter() - t0) / args.images, (time.process_time() - c0) / args.images
        out[name] = {"wall_s_per_image": round(wall, 3), "cpu_s_per_image": round(cpu, 3),
                     "phase2_paris_24_images_x4_cpu_s": round(cpu * 24 * 4, 1),
                     "phase2_ukb_250_images_x4_cpu_s": round(cpu * 250 * 4, 1)}
        print(json.dumps({name: out[name]}), flush=True)
    print(json.dumps({"images": args.images, "map": [args.height, args.width], "threads": 1,
                      "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
