"""mAP of R-MAC with re-ranking and query expansion, through the product's own search path.

Rows (Tolias et al. 2016 Sec. 6 and Salvador et al. 2016 Sec. 3.3): R-MAC; + AML re-ranking (window scored
by its R-MAC); + AML + QE (query averaged with the top-5 localised windows); + CA-SR (sliding windows,
whitened region MAC); + CA-SR + QE (top-5 global vectors). Every image of the collection is indexed with
compact conv maps (index/compact.py); whitening learned on ANOTHER collection (the papers' held-out protocol):
Paris-250 and UKBench with the Holidays index's R-MAC regions, Holidays with the UKBench index's
(``--whitening self``: each index's own, optimistic); queries:

* Paris-250: the 12 queries cropped to their boxes (revisited protocol E/M/H), maps at 1024 px
  (the float maps cached by ``bench_aml.py``, put into an index without a second network pass);
* Holidays-811 (images 325 px as stored) and UKBench-1000 (512 px): the indexed images themselves
  (``Collection.search_indexed``), with a short list of ``--shortlist`` images (default 100).

Writes ``benchmarks/results/rerank.json``. Subsets: not comparable with published numbers.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rerank.py --holidays-index IDX --ukbench-index IDX
"""
from __future__ import annotations

import argparse
import atexit
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from instance_search.eval.runner import benchmark_items, extract_maps
from instance_search.collection import Collection, Describer, fit_whitening
from instance_search.eval.datasets.benchmarks import load_benchmark
from instance_search.index.store import Entry
from instance_search.recipes.base import Recipe
from instance_search import search as S

HERE = Path(__file__).resolve().parent
MAX = {"vectors": "max"}  # the authors' region vectors (the `casr` default "auto" picks max-whitened on R-MAC)
REGIONS = {"space": "regions"}  # Salvador's QE after re-ranking (the default "auto" picks "global" on R-MAC)
CONFIGS = [("R-MAC", None, 0), ("+ AML", "aml", 0), ("+ AML + QE", "aml", 5), ("+ CA-SR", "casr", 0, None, MAX),
           ("+ CA-SR + QE", "casr", 5, REGIONS, MAX), ("+ CA-SR + QE (global)", "casr", 5, {"space": "global"}, MAX),
           ("+ CA-SR (max-whitened)", "casr", 0, None, {"vectors": "max-whitened"}),
           ("+ CA-SR (max-whitened) + QE", "casr", 5, REGIONS, {"vectors": "max-whitened"}),
           ("+ CA-SR (max-whitened) + QE (global)", "casr", 5, {"space": "global"}, {"vectors": "max-whitened"})]
# "+ CA-SR + QE": the default QE after CA-SR, Salvador et al.'s in the region space (rerank/base.py CASR);
# "(global)": average QE of the query's and the top re-ranked images' global vectors, the whole list searched again


def index_from_maps(root: Path, recipe: Recipe, paths, maps, whitening=None) -> Collection:
    """An index built from already computed float maps (same entries ``add_folder`` would write)."""
    col = Collection.create(root, recipe, whitening="none")
    from PIL import Image

    entries = []
    for p, m in zip(paths, maps):
        t = torch.from_numpy(m.astype(np.float32))
        local = recipe.local_from_map(t)
        with Image.open(p) as im:
            w, h = im.size
        entries.append(Entry(path=str(Path(p).resolve()), width=w, height=h, sha256="", mtime=0.0, size=0, local=local,
                             vector=recipe.finalize(local), fmap=m.astype(np.float32)))
    col.store.add(entries)
    if whitening is not None:
        col.set_whitening(whitening)
    return Collection.open(root)


def ranks_for(col: Collection, n_images: int, pos: dict, run) -> np.ndarray:
    hits = run()
    r = [pos[h.path] for h in hits]
    seen = set(r)
    r += [i for i in range(n_images) if i not in seen]  # (never happens with top = collection size)
    return np.asarray(r[:n_images])


def evaluate(bench, col: Collection, queries, shortlist: int, max_queries: int | None, label: str,
             rows_wanted: list[str] | None = None):
    pos = {str(Path(p).resolve()): i for i, p in enumerate(bench.images)}
    n = bench.n_images
    nq = len(queries) if max_queries is None else min(max_queries, len(queries))
    sub = _subset(bench, nq)
    rows = []
    for name, rerank, qe, *opt in CONFIGS:
        if rows_wanted and name not in rows_wanted:
            continue
        qo = opt[0] if opt else None
        ro = opt[1] if len(opt) > 1 else None
        t0 = time.perf_counter()
        cols = []
        for q in tqdm(queries[:nq], desc=f"{label} {name}", leave=False):
            cols.append(ranks_for(col, n, pos, lambda: q(top=n, rerank=rerank, shortlist=shortlist, qe=qe, qe_options=qo,
                                                      rerank_options=ro)))
        res = sub.evaluate(np.stack(cols, 1))
        res = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items() if not k.startswith("mp@")}
        res.update(method=name, seconds_per_query=round((time.perf_counter() - t0) / nq, 3))
        rows.append(res)
        print(label, json.dumps(res))
    return {"queries": nq, "shortlist": shortlist, "rows": rows}


def _subset(bench, nq):
    if nq == bench.n_queries:
        return bench
    import dataclasses

    return dataclasses.replace(bench, query_paths=bench.query_paths[:nq], query_boxes=bench.query_boxes[:nq],
                               gnd=bench.gnd[:nq], query_indices=bench.query_indices[:nq])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--holidays-index", type=Path)
    ap.add_argument("--ukbench-index", type=Path)
    ap.add_argument("--shortlist", type=int, default=100)
    ap.add_argument("--max-queries", type=int, default=None, help="evaluate the first N queries only")
    ap.add_argument("--skip-paris", action="store_true")
    ap.add_argument("--skip-holidays", action="store_true", help="use the Holidays index only for the whitening")
    ap.add_argument("--skip-ukbench", action="store_true", help="use the UKBench index only for the whitening")
    ap.add_argument("--paris-shortlist", type=int, default=100)
    ap.add_argument("--backbone", default="vgg16", help="Paris: the backbone of the R-MAC index (its last conv "
                    "layer; the Holidays index for the whitening must use the same backbone)")
    ap.add_argument("--whitening", choices=["other", "self"], default="other",
                    help="Holidays/UKBench: whitening learned on the other collection's index (papers' protocol) "
                         "or the index's own")
    ap.add_argument("--rows", nargs="+", choices=[c[0] for c in CONFIGS], default=None,
                    help="compute only these rows (default: all)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "rerank.json")
    args = ap.parse_args()
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    if not args.skip_paris:
        bench = load_benchmark("rparis6k")
        recipe = Recipe("rmac", backbone=args.backbone, max_size=1024)
        describer = Describer(recipe, engine="winograd")
        db, queries, _ = benchmark_items(bench)
        qmaps = extract_maps(queries, recipe, describer=describer, cache_dir=HERE / "cache", desc="query crops")
        dbmaps = extract_maps(db, recipe, describer=describer, cache_dir=HERE / "cache", desc="database")
        wh = None  # the papers' protocol: whitening learned on another collection (Holidays regions), else none
        if args.holidays_index is not None:
            hol = Collection.open(args.holidays_index)
            if hol.recipe.backbone != recipe.backbone:
                raise SystemExit(f"--holidays-index {args.holidays_index}: {hol.recipe.backbone} maps, but --backbone "
                                 f"{recipe.backbone}")
            wh = fit_whitening(np.concatenate(hol.store.local_descriptors()),
                               trained_on=f"Holidays-811 R-MAC regions ({args.holidays_index})")
        out["paris250_whitening"] = "none" if wh is None else wh.trained_on
        with tempfile.TemporaryDirectory() as tmp:
            col = index_from_maps(Path(tmp) / "ix", recipe, bench.images, dbmaps, wh)
            qfns = []
            for m in qmaps:
                t = torch.from_numpy(m.astype(np.float32))
                vec = recipe.finalize(recipe.local_from_map(t), col.whitening)
                qfns.append(lambda top, rerank, shortlist, qe, qe_options, rerank_options, v=vec,
                            fm=m.astype(np.float32):
                            S.search_described(col, v, fm, top, S.reranker_for(col, rerank, rerank_options),
                                               shortlist, qe, S.expansion_for("avg", qe_options)))
            out["paris250"] = evaluate(bench, col, qfns, shortlist=args.paris_shortlist, max_queries=None,
                                       label="rparis250", rows_wanted=args.rows)
    others = {"holidays811": args.ukbench_index, "ukbench1000": args.holidays_index}
    for name, idx in (("holidays811", args.holidays_index), ("ukbench1000", args.ukbench_index)):
        if idx is None or (name == "holidays811" and args.skip_holidays) or (name == "ukbench1000" and args.skip_ukbench):
            continue
        bench = load_benchmark("holidays" if name.startswith("holidays") else "ukbench")
        col = Collection.open(idx)
        if args.whitening == "other":
            if others[name] is None:
                raise SystemExit(f"--whitening other: {name} needs the other collection's index too")
            # the papers' protocol: a copy of the index re-whitened with the OTHER collection's R-MAC regions
            tmpdir = tempfile.mkdtemp(prefix=f"rerank-{name}-")
            shutil.copytree(idx, Path(tmpdir) / "ix")
            other = Collection.open(others[name])
            wh = fit_whitening(np.concatenate(other.store.local_descriptors()),
                               trained_on=f"R-MAC regions of {others[name]}")
            atexit.register(shutil.rmtree, tmpdir, True)
            col = Collection.open(Path(tmpdir) / "ix", writable=True)
            col.set_whitening(wh)
            col = Collection.open(Path(tmpdir) / "ix")
        by_path = {r["path"]: r["id"] for r in col.records()}
        qfns = []
        for qi in bench.query_indices:
            iid = by_path[str(Path(bench.images[qi]).resolve())]
            qfns.append(lambda top, rerank, shortlist, qe, qe_options, rerank_options, i=iid: col.search_indexed(
                i, top=top, rerank=rerank, shortlist=shortlist, qe=qe, qe_options=qe_options,
                rerank_options=rerank_options))
        out[name] = evaluate(bench, col, qfns, shortlist=args.shortlist, max_queries=args.max_queries, label=name,
                             rows_wanted=args.rows)
        out[name]["index"] = {"max_size": col.recipe.max_size, "whitening": col.whitening_tag,
                              "whitening_trained_on": col.whitening.trained_on if col.whitening else "none"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
