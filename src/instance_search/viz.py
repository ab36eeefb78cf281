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
