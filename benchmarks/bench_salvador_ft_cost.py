"""What one SGD step of CS-SR fine-tuning costs per image on this machine's CPU, through the product's own trainer
(:func:`instance_search.train.detector.train_detector`), for each phase-2 setting (Salvador et al. 2016, Sec. 3.2):

* ``fc`` -- strategy #1: the FC layers on fixed conv5_3 maps and fixed proposals;
* ``conv5+rpn+fc`` -- the package's earlier #2: conv5_1..conv5_3 + RPN + FC from pool4 maps;
* ``conv2+rpn+fc`` -- #2 as the paper names it ("all layers after the first two conv layers"): conv2_1..conv5_3 +
  RPN + FC from pool1 maps (conv1_1, conv1_2 frozen), the strategy-#2 default.

Maps of the size a 384 x 288 image gives (the bench's and the demo's scale): pool1 64 x 144 x 192, pool4 512 x 18 x
24, conv5_3 512 x 18 x 24; random VGG16 weights (the cost does not depend on them), 64 RoIs, 3x3 RoI pooling, fc
1024 (the bench's head), 300 training proposals, one image per step. One thread, as the benchmarks run. Prints the
wall and CPU seconds per image and the CPU cost of the bench's phase 2 (4 passes over 24 Paris / 250 UKBench
training images). Writes benchmarks/results/salvador_ft_cost.json. Not run in CI.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_salvador_ft_cost.py --images 3
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from instance_search.backbones.vgg16 import VGG16  # noqa: E402
from instance_search.io import atomic_write_bytes  # noqa: E402
from instance_search.nets.detector import Detector, vgg16_block  # noqa: E402
from instance_search.nets.rpn import RPN  # noqa: E402
from instance_search.train import detector as FT  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "salvador_ft_cost.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3, help="timed steps (one image each) per setting, after one warm-up")
    ap.add_argument("--height", type=int, default=288)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--device", default="cpu", help="torch device of the training conv layers")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    vgg = VGG16().eval()
    bb = SimpleNamespace(net=vgg, name="vgg16")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        p1 = torch.relu(torch.randn(64, args.height // 2, args.width // 2, generator=g))
        p4 = vgg16_block("conv2_1", "pool4", bb)(p1[None])[0]
        c5 = vgg16_block("conv5_1", "relu5_3", bb)(p4[None])[0]
    H, W = c5.shape[-2:]
    box = np.array([[W * 16 * 0.2, H * 16 * 0.2, W * 16 * 0.7, H * 16 * 0.8]])
    sample = FT.DetectorSample(box, np.array([1]), p4, c5, "x.jpg", p1)
    out = {}
    for trainable in ("fc", "conv5+rpn+fc", "conv2+rpn+fc"):
        det = Detector(RPN(), 5, pool=3, hidden=1024, trunk=vgg16_block("conv5_1", "relu5_3", bb))
        if trainable == "conv2+rpn+fc":
            FT.with_lower_layers(det, bb)
        props = None
        if trainable == "fc":
            with torch.no_grad():
                props = [det.rpn.propose(c5, 300)[0]] * (args.images + 1)
        samples = [sample] * (args.images + 1)
        cfg = FT.DetectorTrainConfig(trainable=trainable, iterations=args.images + 1, images_per_batch=1,
                                     rois_per_image=64, train_proposals=300)
        hist = FT.train_detector(det, samples, cfg, progress=False, fixed_proposals=props, device=args.device,
                                 desc="cost")
        # the history has one epoch here: subtract a separately timed warm-up step
        cfg1 = FT.DetectorTrainConfig(trainable=trainable, iterations=1, images_per_batch=1, rois_per_image=64,
                                      train_proposals=300)
        t0, c0 = time.perf_counter(), time.process_time()
        FT.train_detector(det, samples[:1], cfg1, progress=False, fixed_proposals=None if props is None else props[:1],
                          device=args.device, desc="cost")
        one_wall, one_cpu = time.perf_counter() - t0, time.process_time() - c0
        e = hist["epochs"][0]
        wall, cpu = e["seconds"] / (args.images + 1), e["cpu_seconds"] / (args.images + 1)
        out[trainable] = {"wall_s_per_image": round(wall, 3), "cpu_s_per_image": round(cpu, 3),
                          "single_step_wall_s": round(one_wall, 3), "single_step_cpu_s": round(one_cpu, 3),
                          "phase2_paris_24_images_x4_cpu_s": round(cpu * 24 * 4, 1),
                          "phase2_ukb_250_images_x4_cpu_s": round(cpu * 250 * 4, 1)}
        print(json.dumps({trainable: out[trainable]}), flush=True)
    meta = {"images": args.images + 1, "pool1": list(p1.shape), "conv5_3": list(c5.shape), "threads":
            torch.get_num_threads(), "device": args.device, "load_average_at_end": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "note": "machine shared with other agents: wall > CPU; steps averaged over the run incl. its first"}
    print(json.dumps(meta))
    atomic_write_bytes(args.out, json.dumps({"meta": meta, "results": out}, indent=1).encode())


if __name__ == "__main__":
    main()
