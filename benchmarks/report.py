"""Print the README's result tables (markdown) from benchmarks/results/retrieval_*.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    rows = []
    for f in sorted((HERE / "results").glob("retrieval_*.json")):
        rows += json.loads(f.read_text())["results"]
    if not rows:
        sys.exit("no results yet: run benchmarks/bench_retrieval.py")
    print("| backbone | recipe | whitening | UKBench-1000 N-S | UKBench-1000 mAP | Holidays-811 mAP "
          "| RParis-250 E / M / H mAP |")
    print("|---|---|---|---|---|---|---|")
    key = lambda r: (r["backbone"], r["recipe"], r["whitening"] != "none")
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["benchmark"]] = r
    for (bb, rec, wh), g in sorted(groups.items(), key=lambda kv: (kv[0][0] != "vgg16", kv[0][1], kv[0][2])):
        uk, ho, pa = g.get("ukbench"), g.get("holidays"), g.get("rparis6k")
        wname = "learned on the other set" if wh else "none"
        cell = lambda r, k: f"{r[k]:.2f}" if r and k in r else "–"
        paris = (f"{pa['map_easy']:.1f} / {pa['map_medium']:.1f} / {pa['map_hard']:.1f}" if pa else "–")
        print(f"| {bb} | {rec.upper().replace('RMAC', 'R-MAC')} | {wname} | {cell(uk, 'ns')} | {cell(uk, 'map')} "
              f"| {cell(ho, 'map')} | {paris} |")
    ms = {r["max_size"] for r in rows}
    print(f"\nmax image side: {', '.join(map(str, sorted(ms)))} px")


if __name__ == "__main__":
    main()
