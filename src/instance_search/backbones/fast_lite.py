"""The ``folded`` CPU engine for EfficientNet-Lite0: BatchNorm folded, NHWC activations, 1x1 convs as matmuls.

:class:`FoldedLite0` runs a loaded :class:`~instance_search.backbones.efficientnet_lite.EfficientNetLite0` for
inference, with the same contract (``forward(x, layers) -> {tap: (B, C, h, w)}``, taps ``stage1`` .. ``stage7``
and ``head``, contiguous NCHW), so it is a drop-in ``Backbone.trunk`` (:func:`~instance_search.backbones.fast.
use_engine`, engine ``folded``, the ``auto`` choice on the CPU). What makes it fast, each choice measured on one
CPU thread (docs/speed.md):

* every BatchNorm is folded into the convolution before it (:func:`~instance_search.backbones.folding.
  fold_batchnorm`: one conv + bias), and every ReLU6 is an in-place ``clamp_`` -- the exact network spends a
  third of its time in ``native_batch_norm`` and out-of-place clamps;
* activations stay channels-last: an NHWC tensor ``(B, H, W, C)``, contiguous. The expand, project and head 1x1
  convolutions (32 of them) are then plain ``(B*H*W, Cin) @ (Cin, Cout) + b`` matmuls (``torch.addmm``; the
  residual added in place by ``addmm_`` into the shortcut), instead of the slow im2col path eager PyTorch takes
  for a 1x1 conv on an NCHW tensor;
* the depthwise convolutions are ``F.conv2d(groups=C)`` on the NCHW view of the NHWC tensor (channels-last,
  oneDNN's depthwise kernel; about 2x faster than on a contiguous NCHW tensor, and 2.5x faster than a loop of
  shifted multiply-adds). TensorFlow "SAME" padding is the conv's own padding where it is symmetric (every
  stride-1 conv, and stride 2 on an odd size); where it is not (stride 2 on an even size: one more pixel after),
  the block's input -- Cin channels, 6x narrower than the expanded tensor -- is padded, expanded, and the border
  of the result zeroed again (it holds ReLU6 of the bias), instead of an ``F.pad`` pass over the expanded tensor.

``dtype=torch.float64`` runs the same arithmetic in float64 (the reference of the folding itself). The weights are
copied when the engine is built: rebuild it after changing them.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .efficientnet_lite import LITE0_LAYERS, EfficientNetLite0, tf_same_padding
from .folding import fold_batchnorm
from .taps import requested_taps
from .workspace import Workspace

__all__ = ["FoldedLite0"]


def _matrix(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A folded 1x1 convolution as ``(W (Cin, Cout), b (Cout,))`` for ``x_nhwc @ W + b``."""
    w, b = fold_batchnorm(conv, bn, dtype)
    if tuple(w.shape[2:]) != (1, 1) or conv.groups != 1 or tuple(conv.stride) != (1, 1):
        raise ValueError(f"expected a dense 1x1 stride-1 convolution, got a {tuple(w.shape)} weight")
    return w.reshape(w.shape[0], w.shape[1]).t().contiguous(), b.contiguous()


@dataclass
class _Spatial:
    """A folded kxk convolution (the stem, or a depthwise one) and how it pads."""

    weight: torch.Tensor  # (Cout, Cin/groups, k, k), channels-last
    bias: torch.Tensor
    k: int
    stride: int
    groups: int
    tf_same: bool

    @classmethod
    def of(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> "_Spatial":
        w, b = fold_batchnorm(conv, bn, dtype)
        return cls(w.contiguous(memory_format=torch.channels_last), b.contiguous(), int(conv.kernel_size[0]),
                   int(conv.stride[0]), int(conv.groups), bool(getattr(conv, "tf_same", False)))

    def pads(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) zero padding of an (h, w) input."""
        if not self.tf_same:
            p = self.k // 2
            return p, p, p, p
        return (*tf_same_padding(h, self.k, self.stride), *tf_same_padding(w, self.k, self.stride))


@dataclass
class _Block:
    expand: tuple[torch.Tensor, torch.Tensor] | None  # (W (Cin, mid), b)
    dw: _Spatial
    project: tuple[torch.Tensor, torch.Tensor]  # (W (mid, Cout), b)
    residual: bool


class FoldedLite0(nn.Module):
    """EfficientNet-Lite0 for inference with every BatchNorm folded, NHWC activations, the 1x1 convolutions as
    matmuls and channels-last depthwise convolutions (see the module's docstring). ``forward(x, layers)`` as
    :meth:`EfficientNetLite0.forward`: ``{tap: (B, C, h, w)}`` contiguous NCHW, in ``dtype``.

    The matmul outputs go into buffers kept between calls (a fresh multi-megabyte tensor per layer costs more in
    page faults than its matmul); :meth:`release` frees them. Calls are serialised by a lock."""

    layer_names = LITE0_LAYERS

    def __init__(self, net: EfficientNetLite0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype
        self.stem = _Spatial.of(net.stem_conv, net.stem_bn, dtype)
        self.stages: list[list[_Block]] = []
        for stage in net.stages:
            blocks = []
            for blk in stage:
                blocks.append(_Block(
                    expand=_matrix(blk.expand_conv, blk.expand_bn, dtype) if blk.has_expand else None,
                    dw=_Spatial.of(blk.dw_conv, blk.dw_bn, dtype),
                    project=_matrix(blk.project_conv, blk.project_bn, dtype),
                    residual=bool(blk.residual)))
            self.stages.append(blocks)
        self.head = _matrix(net.head_conv, net.head_bn, dtype)
        self._ws = Workspace(dtype)
        self._lock = threading.Lock()

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, blocks={sum(len(s) for s in self.stages)}"

    # buffers ------------------------------------------------------------------------------------------------
    def _buf(self, name: str, *shape: int) -> torch.Tensor:
        return self._ws.get(name, shape)

    def workspace_bytes(self) -> int:
        return self._ws.nbytes()

    def release(self) -> None:
        """Free the reused buffers (they come back on the next call)."""
        with self._lock:
            self._ws.clear()

    # forward ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor, layers: Sequence[str] | str | None = None) -> dict[str, torch.Tensor]:
        layers, deepest = requested_taps("efficientnet-lite0", layers, LITE0_LAYERS, "head")
        if x.device.type != "cpu":
            raise ValueError("the folded EfficientNet-Lite0 engine runs on the CPU only")
        with self._lock, torch.inference_mode():
            out = self._forward(x, layers, deepest)
        if not torch.is_inference_mode_enabled():
            out = {k: v.clone() for k, v in out.items()}  # ordinary tensors for a caller outside inference mode
        return out

    @staticmethod
    def _nchw(a: torch.Tensor) -> torch.Tensor:
        """A contiguous NCHW copy of the NHWC tensor ``a`` (always a copy: ``a`` may be a reused buffer)."""
        return a.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)

    def _forward(self, x: torch.Tensor, layers: list[str], deepest: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        x = x.detach().to(self.dtype).contiguous(memory_format=torch.channels_last)
        a = self._spatial(x, self.stem).clamp_(0.0, 6.0).permute(0, 2, 3, 1)  # NHWC, contiguous
        slot = 0
        for i, blocks in enumerate(self.stages):
            for blk in blocks:
                a = self._block(a, blk, f"act{slot % 2}")
                slot += 1
            name = LITE0_LAYERS[i]
            if name in layers:
                out[name] = self._nchw(a)
            if i == deepest:
                return out
        bsz, h, w, c = a.shape
        wh, bh = self.head
        y = self._buf("expand", bsz * h * w, wh.shape[1])
        torch.addmm(bh, a.reshape(-1, c), wh, out=y).clamp_(0.0, 6.0)
        out["head"] = self._nchw(y.view(bsz, h, w, -1))
        return out

    @staticmethod
    def _spatial(x: torch.Tensor, conv: _Spatial) -> torch.Tensor:
        """The folded kxk convolution of the channels-last NCHW tensor ``x`` (padded as the network pads)."""
        top, bottom, left, right = conv.pads(*x.shape[-2:])
        if top == bottom and left == right:
            return F.conv2d(x, conv.weight, conv.bias, conv.stride, (top, left), 1, conv.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, 1, conv.groups)

    def _block(self, a: torch.Tensor, blk: _Block, out_name: str) -> torch.Tensor:
        """One MBConv block on the NHWC tensor ``a``; returns its NHWC output (the buffer ``out_name``)."""
        bsz, h, w, cin = a.shape
        flat = a.reshape(-1, cin)
        if blk.expand is None:
            d = self._spatial(a.permute(0, 3, 1, 2), blk.dw)
        else:
            we, be = blk.expand
            mid = we.shape[1]
            top, bottom, left, right = blk.dw.pads(h, w)
            if top == bottom and left == right:  # the conv pads
                y = torch.addmm(be, flat, we, out=self._buf("expand", bsz * h * w, mid)).clamp_(0.0, 6.0)
                d = F.conv2d(y.view(bsz, h, w, mid).permute(0, 3, 1, 2), blk.dw.weight, blk.dw.bias, blk.dw.stride,
                             (top, left), 1, mid)
            else:
                # pad the block's narrow input (Cin channels, not 6 x Cin), expand it, and zero the border again
                # (it holds ReLU6(bias)): cheaper than an F.pad pass over the expanded tensor
                hp, wp = h + top + bottom, w + left + right
                ap = F.pad(a, (0, 0, left, right, top, bottom))
                y = torch.addmm(be, ap.view(-1, cin), we, out=self._buf("expand", bsz * hp * wp, mid))
                y = y.clamp_(0.0, 6.0).view(bsz, hp, wp, mid)
                y[:, :top].zero_()
                y[:, top + h:].zero_()
                y[:, :, :left].zero_()
                y[:, :, left + w:].zero_()
                d = F.conv2d(y.permute(0, 3, 1, 2), blk.dw.weight, blk.dw.bias, blk.dw.stride, 0, 1, mid)
        d = d.clamp_(0.0, 6.0).permute(0, 2, 3, 1)
        if not d.is_contiguous():  # oneDNN returns channels-last for a channels-last input; this is a safeguard
            d = d.contiguous()
        h2, w2, mid = d.shape[1:]
        wp, bp = blk.project
        res = self._buf(out_name, bsz * h2 * w2, wp.shape[1])
        if blk.residual:
            torch.add(flat, bp, out=res)
            res.addmm_(d.reshape(-1, mid), wp)
        else:
            torch.addmm(bp, d.reshape(-1, mid), wp, out=res)
        return res.view(bsz, h2, w2, wp.shape[1])
