#!/usr/bin/env python
"""kill -9 while indexing, resume, repeat: does the final index equal an uninterrupted run?

``isearch index`` (the real CLI, a subprocess per run) indexes ``--n`` UKBench photos copied into a temporary
folder, VGG16 R-MAC at ``--max-size`` px with the default self-learned whitening (``--n`` >= 100 images, so it
is learned at the end of the run and every stored vector is recomputed: the kills also test that path's
bookkeeping). First one uninterrupted run (the reference). Then ``--kills`` runs, each SIGKILLed at a random
moment: once its progress bar shows a random count within the first 1/(kills left + 1) of its work, plus a
random part of one image's time (so model loading, decoding, forward passes and commits all get hit; tied to
progress rather than the clock, so a change of machine load cannot let the loop finish the work). After every kill the index is opened and checked (ids dense and unique, no path twice, finite unit
vectors, every image seen committed before still there under the same id). A last run finishes the job and
the result is compared with the reference: ids, paths, sizes, checksums, local descriptors, global vectors,
whitening.

Prints the figures and writes benchmarks/results/kill_resume.json.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kill_resume.py [--n 120] [--kills 20] [--max-size 256]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ISEARCH_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "src"))

from instance_search.index.store import IndexStore  # noqa: E402

ISEARCH = str(Path(sys.executable).parent / "isearch")


def run(folder: Path, index: Path, log: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([ISEARCH, "index", str(folder), "--index", str(index), *args], env=env,
                            stdout=subprocess.PIPE, stderr=open(log, "wb"))


def wait_for_bar(proc: subprocess.Popen, log: Path, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while b"indexing" not in log.read_bytes() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return time.monotonic()


def progress(log: Path) -> tuple[int, int] | None:
    """(done, total) of the last progress bar update in a run's stderr."""
    m = re.findall(rb"(\d+)/(\d+) \[", log.read_bytes())
    return (int(m[-1][0]), int(m[-1][1])) if m else None


def kill_during_indexing(proc: subprocess.Popen, log: Path, kills_left: int, jitter_s: float,
                         rng: random.Random, timeout: float = 600) -> tuple[bool, int, float]:
    """SIGKILL ``proc`` once its progress bar shows a random count in the first 1/(kills_left+1) of its work,
    plus a random part of one image's time. Tied to progress, not to the clock, so machine load cannot let
    the loop finish the work. Returns (still running when killed, target count, jitter)."""
    deadline = time.monotonic() + timeout
    target = None
    while proc.poll() is None and time.monotonic() < deadline:
        p = progress(log)
        if p is not None and target is None:
            target = rng.randint(0, p[1] // (kills_left + 1))
        if p is not None and p[0] >= target:
            break
        time.sleep(0.01)
    jitter = rng.uniform(0, jitter_s)
    time.sleep(jitter)
    if proc.poll() is not None:
        return False, target or 0, jitter
    os.kill(proc.pid, signal.SIGKILL)
    return True, target or 0, jitter


def check(index: Path) -> tuple[dict[int, str], list[str]]:
    """(id -> path, problems) of a possibly interrupted index."""
    problems = []
    store = IndexStore.open(index)
    ids, recs = store.ids().tolist(), store.records()
    if ids != list(range(len(ids))):
        problems.append(f"ids not dense/unique: {ids[:10]}...")
    paths = [r["path"] for r in recs]
    if len(set(paths)) != len(paths):
        problems.append(f"{len(paths) - len(set(paths))} duplicated paths")
    if ids:
        v = store.vectors()
        if not (np.isfinite(v).all() and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)):
            problems.append("non-finite or non-unit vectors")
    return dict(zip(ids, paths)), problems


def stray_files(index: Path) -> list[str]:
    """Files in segments/ and maps/ that the catalogue does not name, and stale temp files."""
    return [f.name for f in IndexStore.open(index).leftovers()]


def compare(a: Path, b: Path) -> dict:
    x, y = IndexStore.open(a), IndexStore.open(b)
    keys = ("id", "path", "width", "height", "sha256", "size")
    ra, rb = [{k: r[k] for k in keys} for r in x.records()], [{k: r[k] for k in keys} for r in y.records()]
    same_records = ra == rb
    va, vb = x.vectors(), y.vectors()
    la, lb = x.local_descriptors(), y.local_descriptors()
    wa, wb = x.whitening_info, y.whitening_info
    return {
        "images": len(ra), "reference_images": len(rb), "same_ids_paths_sizes_checksums": same_records,
        "duplicated_paths": len(ra) - len({r["path"] for r in ra}),
        "lost": len({r["path"] for r in rb} - {r["path"] for r in ra}),
        "extra": len({r["path"] for r in ra} - {r["path"] for r in rb}),
        "max_abs_vector_diff": float(np.abs(va - vb).max()) if same_records and va.shape == vb.shape else None,
        "max_abs_local_diff": (max(float(np.abs(p - q).max()) for p, q in zip(la, lb))
                               if same_records and len(la) == len(lb) else None),
        "whitening": wa, "reference_whitening": wb,
        "max_abs_whitening_diff": whitening_diff(a, wa, b, wb),
    }


def whitening_diff(a: Path, wa: dict | None, b: Path, wb: dict | None) -> float | None:
    """Largest difference between the two learned whitenings' arrays (their files differ anyway: they record
    the index folder they were learned on and when); 0.0 when neither index is whitened, None if one is."""
    from instance_search.fitted.whitening import PCAWhitening

    if wa is None or wb is None:
        return 0.0 if wa is wb else None
    x, y = PCAWhitening.load(a / wa["file"]), PCAWhitening.load(b / wb["file"])
    if x.n_samples != y.n_samples:
        return None
    return max(float(np.abs(np.asarray(getattr(x, k), np.float64) - np.asarray(getattr(y, k), np.float64)).max())
               for k in ("mean", "components", "eigenvalues", "scale"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=120, help="UKBench images to index")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--max-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="images per durable commit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "kill_resume.json")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    args = ["--max-size", str(a.max_size), "--batch", str(a.batch), "--recipe", "rmac", "--backbone", "vgg16"]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="isearch-kill-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "photos"
        folder.mkdir()
        for i in range(a.n):
            shutil.copy(DATA / "ukbench1000" / f"ukbench{i:05d}.jpg", folder)
        print(f"reference: uninterrupted `isearch index` of {a.n} images ...", flush=True)
        ref = tmp / "reference"
        t0 = time.monotonic()
        p = run(folder, ref, tmp / "ref.log", args)
        t_bar = wait_for_bar(p, tmp / "ref.log")
        out, _ = p.communicate()
        t_end = time.monotonic()
        if p.returncode != 0:
            sys.exit(f"reference run failed: {(tmp / 'ref.log').read_text()[-2000:]}")
        ref_report = out.decode().strip()
        indexing_s = t_end - t_bar
        print(f"  {ref_report}\n  {t_end - t0:.1f} s in all, {indexing_s:.1f} s from the progress bar to the end")

        index = tmp / "killed"
        seen: dict[int, str] = {}
        records, problems, lost_after_kill = [], [], 0
        bar = tqdm(range(a.kills), desc="kill -9 + resume", unit="kill")
        for k in bar:
            log = tmp / f"run{k}.log"
            p = run(folder, index, log, args)
            killed, target, jitter = kill_during_indexing(p, log, a.kills - k, indexing_s / a.n, rng)
            p.communicate()
            shown = progress(log)
            rec = {"run": k, "killed": killed, "kill_after_image": target, "jitter_s": round(jitter, 3),
                   "progress_shown": None if shown is None else f"{shown[0]}/{shown[1]}"}
            if IndexStore.exists(index):
                stray = stray_files(index)  # before the next writer cleans them up
                now, probs = check(index)
                lost = [i for i, path in seen.items() if now.get(i) != path]
                lost_after_kill += len(lost)
                problems += [f"after kill {k}: {x}" for x in probs]
                if lost:
                    problems.append(f"after kill {k}: {len(lost)} committed images lost or renumbered")
                seen = now
                rec.update(images_in_index=len(now), stray_files=len(stray), problems=probs)
            else:
                rec.update(images_in_index=0, stray_files=0, problems=[])
            records.append(rec)
            bar.set_postfix(images=rec["images_in_index"])
        bar.close()
        kills = sum(r["killed"] for r in records)
        print(f"final resume run ...", flush=True)
        p = run(folder, index, tmp / "final.log", args + ["-q"])
        out, _ = p.communicate()
        final_report = out.decode().strip()
        result = compare(index, ref)
        result["stray_files_after_final_run"] = len(stray_files(index))
    equal = (result["same_ids_paths_sizes_checksums"] and result["max_abs_whitening_diff"] is not None
             and result["max_abs_whitening_diff"] <= 1e-5
             and result["max_abs_vector_diff"] is not None and result["max_abs_vector_diff"] <= 1e-5
             and result["max_abs_local_diff"] is not None and result["max_abs_local_diff"] <= 1e-3)
    summary = {
        "benchmark": "kill -9 while `isearch index` runs, then resume",
        "config": {"images": a.n, "kills_requested": a.kills, "max_size": a.max_size, "batch": a.batch,
                   "recipe": "rmac", "backbone": "vgg16", "whitening": "self (default)", "seed": a.seed},
        "reference": {"report": ref_report, "indexing_s": round(indexing_s, 2)},
        "kills": kills,
        "kills_that_left_a_partial_index": sum(r["killed"] and 0 < r["images_in_index"] < a.n for r in records),
        "committed_images_lost_after_a_kill": lost_after_kill,
        "runs": records,
        "final_report": final_report,
        "final_vs_reference": result,
        "final_equals_reference": bool(equal),
        "problems": problems,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_before": [round(x, 2) for x in load_before],
                    "load_after": [round(x, 2) for x in os.getloadavg()]},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(summary, indent=1))
    print(f"kills delivered while indexing: {kills} of {a.kills} "
          f"({summary['kills_that_left_a_partial_index']} left a partial index)")
    print(f"committed images lost after a kill: {lost_after_kill}; problems seen: {len(problems)}")
    print(f"final: {final_report}")
    print(f"final vs uninterrupted: {result['images']} vs {result['reference_images']} images, "
          f"same ids/paths/checksums: {result['same_ids_paths_sizes_checksums']}, duplicated: "
          f"{result['duplicated_paths']}, lost: {result['lost']}, max |vector diff| {result['max_abs_vector_diff']}, "
          f"max |local diff| {result['max_abs_local_diff']}, max |whitening diff| {result['max_abs_whitening_diff']}, "
          f"stray files: {result['stray_files_after_final_run']}")
    print(f"final index equals the uninterrupted run: {equal}  -> {a.out}")
    if not equal or problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
