"""`isearch search`: rank an index by a query image, re-rank a short list, expand the query."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from ..images import printable

from .common import EXPECTED_ERRORS as _EXPECTED
from .common import fail, message
from .main import app


def _fail(exc: BaseException) -> None:
    fail(message(exc))


@app.command()
def search(
    query: Path = typer.Argument(..., help="Query image."),
    index_dir: Path = typer.Option(..., "--index", help="Index folder."),
    box: Optional[str] = typer.Option(None, help="x1,y1,x2,y2 in query-image pixels; the query is cropped to it."),
    top: int = typer.Option(10, help="Number of results."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    show: Optional[Path] = typer.Option(None, help="Draw the ranked list into this PNG."),
    rerank: str = typer.Option("none", help="none | aml (Tolias: localise with AML) | aml-fast (coarse AML on the "
                               "query's strongest channels) | casr (Salvador CA-SR) | cs-sr (Salvador CS-SR: "
                               "a fine-tuned detector, --detector)."),
    shortlist: int = typer.Option(1000, help="How many top results to re-rank."),
    detector: Optional[Path] = typer.Option(None, help="cs-sr: the detector file (.pt) of `isearch finetune`."),
    fast_k: int = typer.Option(512, "--fast-k", help="aml-fast: number of query channels K (512: all VGG16 ones)."),
    fast_g: int = typer.Option(8, "--fast-g", help="aml-fast: max-pooling factor g of the coarse maps."),
    fast_step: int = typer.Option(2, "--fast-step", help="aml-fast: window step in coarse cells."),
    qe: int = typer.Option(0, help="Query expansion with the top QE results (0: off)."),
    qe_kind: str = typer.Option("avg", "--qe-kind", help="avg (Chum 2007: average the top QE) | alpha (Radenović "
                                "2018, weights cos^3) | dba (database-side augmentation over QE neighbours)."),
    faiss_kind: str = typer.Option("flat", "--faiss", help="flat (exact) | hnsw | ivfpq (approximate)."),
) -> None:
    """Rank the indexed images by similarity to QUERY (optionally re-ranked, with boxes, and expanded)."""
    from ..collection import Collection
    from ..images import parse_box

    try:
        b = parse_box(box)
        col = Collection.open(index_dir, faiss_kind=faiss_kind)
        col.aml_fast_options = {"K": fast_k, "g": fast_g, "step": fast_step}
        t0 = time.perf_counter()
        hits = col.search(query, box=b, top=top, rerank=rerank, shortlist=shortlist, qe=qe, qe_kind=qe_kind,
                          detector=detector)
        dt = time.perf_counter() - t0
    except _EXPECTED as exc:
        _fail(exc)
    if show is not None:
        from ..viz import draw_ranked

        draw_ranked(query, [h.path for h in hits], [h.score for h in hits], show, query_box=b,
                    boxes=[h.box for h in hits])
    if as_json:
        hits_json = [dict(d, path=printable(d["path"])) if isinstance(d.get("path"), str) else d
                     for d in (h.to_dict() for h in hits)]  # valid UTF-8 even for non-UTF-8 file names
        typer.echo(json.dumps({"query": printable(str(query)), "box": None if b is None else b.as_tuple(),
                               "seconds": round(dt, 4), "hits": hits_json}, indent=1))
    else:
        for h in hits:
            where = "" if h.box is None else "  box " + ",".join(f"{v:.0f}" for v in h.box)
            typer.echo(f"{h.rank:4d}  {h.score:.4f}  {printable(h.path)}{where}")
        typer.secho(f"{len(hits)} results in {dt * 1000:.0f} ms", err=True)
