"""Record the hits of Collection.search / search_indexed on a small real index (12 UKBench photos, R-MAC,
VGG16, 256 px; unwhitened and whitened) for every re-ranking / QE combination that existed before the
re-ranker registry (rerank/base.py, search.py). tests/rerank/test_rerank_registry.py rebuilds the same index and
checks that today's code gives the same hits.

Run once, from the repository root:  .venv/bin/python tests/rerank/record_before_hits.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "before_hits.json"
PHOTOS = [f"ukbench{i:05d}.jpg" for i in range(12)]
#: (rerank, qe) combinations; shortlist 8, top 12
CASES = [(None, 0), ("aml", 0), ("aml", 3), ("casr", 0), ("casr", 3), ("aml-fast", 0), (None, 3), ("aml-fast", 2)]
AML_FAST = {"K": 64, "g": 2, "step": 1}
QUERY, BOX, INDEXED = "ukbench00001.jpg", (40, 30, 600, 450), "ukbench00005.jpg"


def build(root: Path, ukbench: Path, whitened: bool):
    from instance_search.collection import Collection
    from instance_search.recipes.base import Recipe

    col = Collection.create(root, Recipe("rmac", backbone="vgg16", max_size=256), whitening="none", engine="exact")
    col.add_folder([ukbench / p for p in PHOTOS], progress=False)
    if whitened:
        col.set_whitening(col.learn_whitening(dim=64))
    return Collection.open(root, engine="exact")


def hits_json(hits):
    return [[Path(h.path).name, round(float(h.score), 6), None if h.box is None else list(h.box)] for h in hits]


def run_cases(col, ukbench: Path, search):
    """``search(col, query, box, indexed_id, rerank, qe)`` -> (hits of the file query, hits of the indexed query)."""
    col.aml_fast_options = dict(AML_FAST)
    rid = next(r["id"] for r in col.records() if r["path"].endswith(INDEXED))
    out = {}
    for rerank, qe in CASES:
        a, b = search(col, ukbench / QUERY, BOX, rid, rerank, qe)
        out[f"{rerank or 'none'}/qe{qe}/file"] = hits_json(a)
        out[f"{rerank or 'none'}/qe{qe}/indexed"] = hits_json(b)
    return out


def old_api(col, query, box, rid, rerank, qe):
    return (col.search(query, box=box, top=12, rerank=rerank, shortlist=8, qe=qe),
            col.search_indexed(rid, top=12, rerank=rerank, shortlist=8, qe=qe))


def dump(res: dict) -> str:
    """One line per case."""
    blocks = []
    for name, cases in res.items():
        rows = ",\n".join(f"  {json.dumps(c)}: {json.dumps(h)}" for c, h in cases.items())
        blocks.append(f" {json.dumps(name)}: {{\n{rows}\n }}")
    return "{\n" + ",\n".join(blocks) + "\n}\n"


def main() -> None:
    import tempfile

    sys.path.insert(0, str(HERE.parent))
    from conftest import DATA

    ukbench = DATA / "ukbench1000"
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for whitened in (False, True):
            col = build(Path(tmp) / f"ix{int(whitened)}", ukbench, whitened)
            res["whitened" if whitened else "plain"] = run_cases(col, ukbench, old_api)
    OUT.write_text(dump(res))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
