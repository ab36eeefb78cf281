"""`isearch search`: rank an index by a query image, re-rank a short list, expand the query; or many queries in
one process (a folder, or a CSV / JSON list of image + box) written as JSON lines or CSV."""
from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from ..images import printable

from .common import EXPECTED_ERRORS as _EXPECTED
from .common import ENGINE, fail, message
from .device import DEVICE, resolve_device
from .main import app

CSV_FIELDS = ["query", "qx1", "qy1", "qx2", "qy2", "rank", "id", "path", "score", "x1", "y1", "x2", "y2", "error"]


def _fail(exc: BaseException) -> None:
    fail(message(exc))


def read_queries(source: Path) -> list[tuple[Path, Any]]:
    """The (image, box or None) queries of a batch: every image under a folder (no box), or a list file.

    * ``.csv``: a header row naming ``image`` and either ``box`` (``"x1,y1,x2,y2"``) or ``x1,y1,x2,y2``
      columns (empty: whole image);
    * ``.json``: a list of image paths or of objects ``{"image": path, "box": [x1, y1, x2, y2] | "x1,y1,x2,y2" |
      null}``.

    Relative image paths are relative to the list file's folder. A malformed entry is refused (ValueError
    naming the file and the line or item); a missing image is refused before any search runs."""
    from ..images import list_images, parse_box

    if source.is_dir():
        return [(p, None) for p in list_images(source)]
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such query image, folder or list")
    suffix = source.suffix.lower()
    base = source.parent
    rows: list[tuple[Path, Any, str]] = []
    if suffix == ".csv":
        try:
            text = source.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{source}: not a UTF-8 text file ({exc.reason})") from None
        reader = csv.DictReader(io.StringIO(text))
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "image" not in cols:
            raise ValueError(f"{source}: the first row must name the columns, with 'image' and optionally 'box' or "
                             f"x1,y1,x2,y2 (got {reader.fieldnames})")
        reader.fieldnames = cols
        for n, row in enumerate(reader, start=2):
            where = f"{source}:{n}"
            image = (row.get("image") or "").strip()
            if not image:
                raise ValueError(f"{where}: empty 'image'")
            if "box" in cols:
                box = (row.get("box") or "").strip() or None
            elif all(k in cols for k in ("x1", "y1", "x2", "y2")):
                vals = [(row.get(k) or "").strip() for k in ("x1", "y1", "x2", "y2")]
                box = None if not any(vals) else ",".join(vals)
            else:
                box = None
            rows.append((Path(image), box, where))
    elif suffix == ".json":
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise ValueError(f"{source}: expected a JSON list of image paths or {{\"image\": ..., \"box\": ...}}")
        for n, item in enumerate(data):
            where = f"{source}: item {n}"
            if isinstance(item, str):
                rows.append((Path(item), None, where))
            elif isinstance(item, dict) and isinstance(item.get("image"), str) and item["image"]:
                unknown = set(item) - {"image", "box"}
                if unknown:
                    raise ValueError(f"{where}: unknown keys {sorted(unknown)} (use 'image' and 'box')")
                rows.append((Path(item["image"]), item.get("box"), where))
            else:
                raise ValueError(f"{where}: expected an image path or {{\"image\": path, \"box\": ...}}, got {item!r}")
    else:
        return [(source, None)]  # one query image
    out = []
    for image, box, where in rows:
        path = image if image.is_absolute() else base / image
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image {printable(str(image))} not found "
                                    f"(looked at {printable(str(path))})")
        try:
            b = parse_box(box)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        out.append((path, b))
    if not out:
        raise ValueError(f"{source}: no queries in it")
    return out


def parse_options(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs of ``--rerank-option`` / ``--qe-option`` as a dict; a VALUE that reads as JSON (a
    number, true / false, null, a quoted string) is taken as such, anything else as a string. The re-ranker or
    expansion itself refuses unknown keys and values, naming its choices (rerank/base.py)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag} {pair!r}: expected KEY=VALUE, e.g. {flag} "
                             + ("vectors=max" if flag.startswith("--rerank") else "space=global"))
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if isinstance(value, (list, dict)):
            value = raw
        out[key] = value
    return out


def _is_batch(query: Path) -> bool:
    return query.is_dir() or query.suffix.lower() in (".csv", ".json")


@app.command()
def search(
    query: Path = typer.Argument(..., help="Query image; or, for many queries in one process, a folder of images "
                                           "or a .csv / .json list of image + box."),
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
    rerank_option: Optional[list[str]] = typer.Option(
        None, "--rerank-option", help="KEY=VALUE option of the re-ranking, repeatable; e.g. casr: vectors=max "
                                      "(Salvador's, L2 only; default) | max-whitened | sum; aml-fast: K=64; cs-sr: "
                                      "proposals=300, box=proposal | regressed."),
    qe: int = typer.Option(0, help="Query expansion with the top QE results (0: off)."),
    qe_kind: str = typer.Option("avg", "--qe-kind", help="avg (Chum 2007: average the top QE) | alpha (Radenović "
                                "2018, weights cos^3) | dba (database-side augmentation over QE neighbours)."),
    qe_option: Optional[list[str]] = typer.Option(
        None, "--qe-option", help="KEY=VALUE option of the query expansion, repeatable; e.g. avg after casr / cs-sr: "
                                  "space=auto (default: global on a whitened MAC / R-MAC index, else regions) | "
                                  "regions (Salvador Sec. 4.3) | global; alpha / dba: alpha=3."),
    first_stage: Optional[str] = typer.Option(
        None, "--first-stage", help="With --box: rank first with the box crop (box: the revisited protocol) or "
                                    "with the whole image, the box used in re-ranking (image: Salvador et al. "
                                    "2016); default: the recipe's (image for ipa / rpa, else box)."),
    faiss_kind: str = typer.Option("flat", "--faiss", help="flat (exact) | hnsw | ivfpq (approximate)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Batch: write the results to this file (default: "
                                                           "standard output)."),
    fmt: str = typer.Option("auto", "--format", help="Batch output: jsonl (one JSON object per query) | csv (one "
                                                     "row per hit); auto: csv when --out ends in .csv, else jsonl."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Batch: a progress bar on stderr."),
    device: str = DEVICE,
    engine: str = ENGINE,
) -> None:
    """Rank the indexed images by similarity to QUERY (optionally re-ranked, with boxes, and expanded)."""
    from ..collection import Collection
    from ..images import parse_box

    batch = _is_batch(query)
    try:
        if batch:
            if box is not None or show is not None:
                raise ValueError("--box and --show are for one query image; a batch list carries a box per query")
            kind = fmt.lower()
            if kind == "auto":
                kind = "csv" if out is not None and out.suffix.lower() == ".csv" else "jsonl"
            if kind not in ("jsonl", "csv"):
                raise ValueError(f"--format {fmt!r}: expected jsonl, csv or auto")
            queries = read_queries(query)
        b = parse_box(box)
        r_opts = parse_options(rerank_option, "--rerank-option")
        q_opts = parse_options(qe_option, "--qe-option")
        col = Collection.open(index_dir, faiss_kind=faiss_kind, device=resolve_device(device), engine=engine)
        col.aml_fast_options = {"K": fast_k, "g": fast_g, "step": fast_step}
        if batch:
            _run_batch(col, queries, out, kind, progress, top=top, rerank=rerank, shortlist=shortlist, qe=qe,
                       qe_kind=qe_kind, detector=detector, rerank_options=r_opts or None,
                       qe_options=q_opts or None, first_stage=first_stage)
            return
        t0 = time.perf_counter()
        hits = col.search(query, box=b, top=top, rerank=rerank, shortlist=shortlist, qe=qe, qe_kind=qe_kind,
                          detector=detector, rerank_options=r_opts or None, qe_options=q_opts or None,
                          first_stage=first_stage)
        dt = time.perf_counter() - t0
    except _EXPECTED as exc:
        _fail(exc)
    if show is not None:
        from ..viz import draw_ranked

        draw_ranked(query, [h.path for h in hits], [h.score for h in hits], show, query_box=b,
                    boxes=[h.box for h in hits])
    if as_json:
        typer.echo(json.dumps({"query": printable(str(query)), "box": None if b is None else b.as_tuple(),
                               "seconds": round(dt, 4), "hits": _hits_json(hits)}, indent=1))
    else:
        for h in hits:
            where = "" if h.box is None else "  box " + ",".join(f"{v:.0f}" for v in h.box)
            typer.echo(f"{h.rank:4d}  {h.score:.4f}  {printable(h.path)}{where}")
        typer.secho(f"{len(hits)} results in {dt * 1000:.0f} ms", err=True)


def _hits_json(hits) -> list[dict]:
    return [dict(d, path=printable(d["path"])) if isinstance(d.get("path"), str) else d
            for d in (h.to_dict() for h in hits)]  # valid UTF-8 even for non-UTF-8 file names


def _run_batch(col, queries, out: Path | None, kind: str, progress: bool, **search_kw) -> None:
    """Search every query with one open collection (the network and the index loaded once); one JSON line per
    query or one CSV row per hit, written as each query finishes. A query that fails (unreadable image, box
    outside it) gets its error in its line / row and the rest go on; the exit code is then 1."""
    from tqdm import tqdm

    from ..images import BoxError, ImageError

    stream = sys.stdout if out is None else open(out, "w", encoding="utf-8", newline="")
    failed = 0
    t_all = time.perf_counter()
    try:
        writer = None
        if kind == "csv":
            writer = csv.writer(stream, lineterminator="\n")
            writer.writerow(CSV_FIELDS)
        bar = tqdm(queries, desc="queries", unit="query", file=sys.stderr, disable=not progress or len(queries) < 2)
        for path, b in bar:
            qbox = None if b is None else [round(float(v), 2) for v in b.as_tuple()]
            name = printable(str(path))
            t0 = time.perf_counter()
            try:
                hits = col.search(path, box=b, top=search_kw["top"], rerank=search_kw["rerank"],
                                  shortlist=search_kw["shortlist"], qe=search_kw["qe"], qe_kind=search_kw["qe_kind"],
                                  detector=search_kw["detector"], rerank_options=search_kw["rerank_options"],
                                  qe_options=search_kw["qe_options"], first_stage=search_kw["first_stage"])
                err = None
            except (ImageError, BoxError) as exc:
                hits, err = [], message(exc)
                failed += 1
            dt = time.perf_counter() - t0
            if writer is None:
                row = {"query": name, "box": qbox, "seconds": round(dt, 4)}
                row.update({"error": err} if err is not None else {"hits": _hits_json(hits)})
                stream.write(json.dumps(row) + "\n")
            elif err is not None:
                writer.writerow([name, *(qbox or [""] * 4), "", "", "", "", "", "", "", "", printable(err)])
            else:
                for h in hits:
                    writer.writerow([name, *(qbox or [""] * 4), h.rank, h.id, printable(h.path),
                                     f"{h.score:.6f}", *(["", "", "", ""] if h.box is None else
                                                          [f"{v:.1f}" for v in h.box]), ""])
            stream.flush()
    finally:
        if out is not None:
            stream.close()
    dt = time.perf_counter() - t_all
    where = "" if out is None else f" to {out}"
    typer.secho(f"{len(queries)} queries in {dt:.1f} s ({dt / len(queries) * 1000:.0f} ms each){where}"
                + (f"; {failed} failed (their error is in the output)" if failed else ""), err=True)
    if failed:
        raise typer.Exit(1)
