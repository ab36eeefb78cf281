"""Pictures people look at: ranked result grids with boxes."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .images import Box, load_image


def draw_ranked(query: str | os.PathLike, paths: Sequence[str], scores: Sequence[float], out: str | os.PathLike,
                query_box: Box | None = None, boxes: Sequence[tuple | None] | None = None,
                relevant: Sequence[bool] | None = None, cols: int = 6, thumb: int = 256) -> Path:
    """Save a grid: the query (with its box) then the ranked results with score, box and, when ``relevant``
    is given, a green (relevant) or red (not) frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(paths) + 1
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.2, rows * 2.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    items = [(str(query), None, query_box, None)] + [
        (p, s, (boxes[i] if boxes else None), (relevant[i] if relevant is not None else None))
        for i, (p, s) in enumerate(zip(paths, scores))
    ]
    for k, (path, score, box, rel) in enumerate(items):
        ax = axes.ravel()[k]
        img = load_image(path)
        sc = thumb / max(img.size)
        ax.imshow(img.resize((max(1, int(img.width * sc)), max(1, int(img.height * sc)))))
        if box is not None:
            b = box.as_tuple() if isinstance(box, Box) else box
            ax.add_patch(Rectangle((b[0] * sc, b[1] * sc), (b[2] - b[0]) * sc, (b[3] - b[1]) * sc,
                                   fill=False, ec="yellow", lw=2))
        title = "query" if score is None else f"#{k} {score:.3f}"
        ax.set_title(title, fontsize=8)
        if rel is not None:
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_edgecolor("green" if rel else "red")
                spine.set_linewidth(3)
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def mac_components(map_a, map_b, k: int = 5):
    """The ``k`` MAC components contributing most to ``cos(MAC(a), MAC(b))`` (Tolias et al. 2016, Fig. 2).

    Returns rows ``(channel, contribution, (ya, xa), (yb, xb))``: the contribution ``â_i·b̂_i`` of channel ``i`` to
    the cosine of the L2-normalised MACs, and the cell of each map where the channel attains its maximum.
    """
    import numpy as np

    from .ops.normalize import l2n

    A, B = np.asarray(map_a, np.float32), np.asarray(map_b, np.float32)
    if A.ndim != 3 or B.ndim != 3 or A.shape[0] != B.shape[0]:
        raise ValueError(f"need two (C, H, W) maps with the same C, got {A.shape} and {B.shape}")
    a, b = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
    ma, mb = a.max(1), b.max(1)
    contrib = l2n(ma) * l2n(mb)
    top = np.argsort(-contrib, kind="stable")[:k]
    rows = []
    for c in top:
        ia, ib = int(a[c].argmax()), int(b[c].argmax())
        rows.append((int(c), float(contrib[c]), divmod(ia, A.shape[2]), divmod(ib, B.shape[2])))
    return rows


def draw_mac_receptive_fields(img_a, img_b, map_a, map_b, out: str | os.PathLike, *, stride: int = 16,
                              receptive_field: int = 196, k: int = 5) -> Path:
    """Tolias et al. 2016 Fig. 2: the receptive fields (squares of ``receptive_field`` pixels centred on the
    cells, VGG16 conv5_3: 196 px, stride 16) of the ``k`` MAC components that contribute most to the similarity
    of two images, in matching colours on both. ``img_*``: PIL images the maps were computed from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    rows = mac_components(map_a, map_b, k)
    colours = plt.cm.tab10.colors
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, img, key in ((axes[0], img_a, 2), (axes[1], img_b, 3)):
        ax.imshow(img)
        ax.set_axis_off()
        for n, row in enumerate(rows):
            y, x = row[key]
            cx, cy = (x + 0.5) * stride, (y + 0.5) * stride
            r = receptive_field / 2
            ax.add_patch(patches.Rectangle((cx - r, cy - r), 2 * r, 2 * r, fill=False, lw=2.2,
                                           edgecolor=colours[n % 10]))
            ax.plot([cx], [cy], "o", color=colours[n % 10], ms=4)
    axes[0].set_title("query: receptive fields of the top-%d MAC components" % k, fontsize=9)
    axes[1].set_title("database image: " + ", ".join(f"ch{r[0]} {r[1]:.3f}" for r in rows), fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
