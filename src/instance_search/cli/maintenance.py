"""``isearch check`` and ``isearch repair``: verify an index folder and bring a damaged one back (issue 13)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..images import printable as _line  # a file name cannot fake another output line
from .common import expected_errors as _errors
from .common import fail as _fail
from .common import message as _msg
from .main import app


@app.command()
def check(
    index_dir: Path = typer.Option(..., "--index", help="Index folder."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object: ok, images, problems, notes."),
) -> None:
    """Verify every file and record of an index (catalogue, segment and map checksums, ids, FAISS); exit 1 if
    anything is wrong, naming it."""
    from ..index.repair import check_index

    try:
        rep = check_index(index_dir)
    except _errors() as exc:
        _fail(_msg(exc))
    if as_json:
        typer.echo(json.dumps({"index": str(index_dir), "ok": rep.ok, "images": rep.images,
                               "problems": rep.problems, "notes": rep.notes}, ensure_ascii=True))
    else:
        for p in rep.problems:
            typer.secho(f"problem: {_line(p)}", fg=typer.colors.RED)
        for n in rep.notes:
            typer.echo(f"note: {_line(n)}")
        typer.echo(f"{_line(str(index_dir))}: " + (f"ok, {rep.images} images" if rep.ok else
                                                     f"{len(rep.problems)} problems (run `isearch repair`)"))
    if not rep.ok:
        raise typer.Exit(1)


@app.command()
def repair(
    index_dir: Path = typer.Option(..., "--index", help="Index folder."),
    reextract: bool = typer.Option(False, "--reextract", help="Run the network again on the dropped images (and "
                                                             "those that lost their maps) whose photos still exist."),
    wait: float = typer.Option(60.0, "--wait", help="Seconds to wait for another writer to finish."),
    weights: Optional[str] = typer.Option(None, help="--reextract: weights source or local .pt file."),
) -> None:
    """Bring a damaged index back to a consistent, searchable state, keeping every image that can be read; list
    the images it had to drop."""
    from ..index.repair import check_index, repair_index
    from ..index.store import set_default_wait

    try:
        set_default_wait(wait)
        rep = repair_index(index_dir)
    except _errors() as exc:
        _fail(_msg(exc))
    for a in rep.actions:
        typer.echo(f"repaired: {_line(a)}")
    for p in rep.lost:
        typer.secho(f"dropped (unreadable): {_line(p)}", fg=typer.colors.YELLOW)
    for p in rep.maps_lost:
        typer.secho(f"kept without its conv map: {_line(p)}", fg=typer.colors.YELLOW)
    if reextract and (rep.lost or rep.maps_lost):
        from ..collection import Collection

        again = [Path(p) for p in dict.fromkeys(rep.lost + rep.maps_lost) if Path(p).is_file()]
        gone = len(set(rep.lost + rep.maps_lost)) - len(again)
        try:
            col = Collection.open(index_dir, writable=True, weights=weights)
            ids = [r["id"] for r in col.store.records() if r["path"] in {str(p) for p in again}]
            col.store.remove(ids)  # those kept without maps are described again, with them
            report = col.add_folder(again, progress=False)
        except _errors() as exc:
            _fail(_msg(exc))
        typer.echo(f"re-extracted: {report.summary()}" + (f"; {gone} photos no longer exist" if gone else ""))
    final = check_index(index_dir)
    if not final.ok:  # never expected: say so rather than claim success
        for p in final.problems:
            typer.secho(f"problem: {_line(p)}", fg=typer.colors.RED, err=True)
        _fail("the index still has problems after repair")
    typer.echo(f"{_line(str(index_dir))}: consistent, {final.images} images")
