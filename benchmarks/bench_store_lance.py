"""The index catalogue on SQLite (index/store.py) against a minimal Lance-backed catalogue (``pylance``), on this
machine and on the workload of benchmarks/bench_store.py (whose entry generator, writer/reader children and checks
are imported here for the SQLite side): add N images in batches of 32, kill -9 of a writer at random moments,
concurrent writer processes into one table, a reader opening and counting while they write (issue 13).

The Lance catalogue holds per image what the SQLite store keeps for it (id, path, sha256, width, height, mtime,
size, segment, the 512-D float32 global vector) plus the same payload bytes the store writes to its segment
files (the 20 x 512 local descriptors as fp16, the compact feature-map code), so both sides store the same data.
Ids are allocated by the writer as max(id)+1 and committed with ``merge_insert("id")`` (insert when not matched,
fail when matched) under Lance's own commit-conflict retry; a writer that loses an id race re-reads and retries.

    pip install '.[bench]'   # pylance: a benchmark-only dependency
    python benchmarks/bench_store_lance.py [--images 1000] [--kills 20] [--writers 4] [--per-writer 100]

Writes benchmarks/results/store_lance.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_store as bs  # noqa: E402  (the SQLite side and the shared workload)

ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 300  # no child may outlive this: killed and reported


def _lance():
    try:
        import lance
        import pyarrow as pa
    except ImportError as exc:  # benchmark-only dependency: say how to get it
        raise SystemExit(f"bench_store_lance.py needs pylance (pip install '.[bench]'): {exc}") from exc
    return lance, pa


def schema():
    _, pa = _lance()
    return pa.schema([("id", pa.int64()), ("path", pa.string()), ("sha256", pa.string()), ("width", pa.int32()),
                      ("height", pa.int32()), ("mtime", pa.float64()), ("size", pa.int64()),
                      ("segment", pa.string()), ("vector", pa.list_(pa.float32(), 512)),
                      ("local", pa.binary()), ("fmap", pa.binary())])


class LanceCatalog:
    """One Lance dataset, one row per image. Only what the benchmark needs: create, open, add, read."""

    def __init__(self, uri: Path):
        self.uri = str(uri)
        self.id_races = 0  # batches whose ids another writer took first (re-read and retried)

    @classmethod
    def create(cls, uri: Path) -> "LanceCatalog":
        lance, _ = _lance()
        lance.write_dataset(schema().empty_table(), str(uri), mode="create")
        return cls(uri)

    @classmethod
    def open_or_create(cls, uri: Path) -> "LanceCatalog":
        lance, _ = _lance()
        try:
            lance.dataset(str(uri))
            return cls(uri)
        except (ValueError, OSError):  # not there yet (pylance raises ValueError "Dataset at path ... was not found")
            try:
                return cls.create(uri)
            except OSError:  # another writer created it meanwhile
                return cls(uri)

    def _table(self, entries, first: int):
        _, pa = _lance()
        ids = list(range(first, first + len(entries)))
        seg = f"seg-{first:09d}-{len(entries):06d}"
        vec = np.stack([np.asarray(e.vector, np.float32) for e in entries])
        cols = {"id": ids, "path": [e.path for e in entries], "sha256": [e.sha256 for e in entries],
                "width": [e.width for e in entries], "height": [e.height for e in entries],
                "mtime": [e.mtime for e in entries], "size": [e.size for e in entries],
                "segment": [seg] * len(entries),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel(), pa.float32()), 512),
                "local": [np.asarray(e.local, np.float16).tobytes() for e in entries],
                "fmap": [bytes(e.fmap) for e in entries]}
        return pa.Table.from_pydict(cols, schema=schema()), ids

    def add(self, entries, max_races: int = 50) -> list[int]:
        """Commit ``entries`` as one Lance transaction; returns their ids once committed."""
        lance, pa = _lance()
        import pyarrow.compute as pc
        for _ in range(max_races):
            ds = lance.dataset(self.uri)
            top = pc.max(ds.to_table(columns=["id"])["id"]).as_py()
            table, ids = self._table(entries, 0 if top is None else top + 1)
            try:
                (ds.merge_insert("id").when_matched_fail().when_not_matched_insert_all()
                 .conflict_retries(20).execute(table))
                return ids
            except Exception as exc:  # noqa: BLE001 - an id taken by a concurrent writer: re-read, retry
                if "match" not in str(exc).lower() and "conflict" not in str(exc).lower():
                    raise
                self.id_races += 1
                time.sleep(random.uniform(0, 0.05))
        raise RuntimeError(f"{self.uri}: ids still taken after {max_races} tries")


# ------------------------------------------------------------------------------------------------ child roles
def child_writer(root: str, tag: str, batches: int, batch: int, seed: int) -> None:
    mod = bs.load_store("sqlite")  # only for its Entry: the same entries as the SQLite writer
    rng = np.random.default_rng(seed)
    cat = LanceCatalog.open_or_create(Path(root))
    for b in range(batches):
        es = bs.entries(mod, rng, batch, f"{tag}-{b}")
        ids = cat.add(es)
        print(json.dumps({"ids": ids, "paths": [e.path for e in es], "id_races": cat.id_races}), flush=True)


def child_reader(root: str, seconds: float, batch: int) -> None:
    """Open the dataset again and again until SIGTERM; count failed opens, torn views (a row count that is not
    whole batches or disagrees with count_rows, a null vector) and views with an id held by two images; print
    one JSON line."""
    lance, _ = _lance()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    end, reads, errors, torn, dup, versions = time.time() + seconds, 0, [], 0, 0, set()
    while time.time() < end and not stop:
        try:
            ds = lance.dataset(root)
            t = ds.to_table(columns=["id", "vector"])
            n = ds.count_rows()
            ids = t["id"].to_numpy()
            if n != t.num_rows or t.num_rows % batch or t["vector"].null_count:
                torn += 1
            if len(np.unique(ids)) != len(ids):
                dup += 1
            versions.add(ds.version)
            reads += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors.append(f"{exc.__class__.__name__}: {str(exc)[:160]}")
    print(json.dumps({"reads": reads, "errors": len(errors), "first_errors": errors[:3], "torn": torn,
                      "views_with_duplicate_ids": dup, "versions_seen": len(versions)}), flush=True)


# ------------------------------------------------------------------------------------------------ measurements
def verify(root: Path, want: list[tuple[int, str]]) -> dict:
    lance, _ = _lance()
    try:
        t = lance.dataset(str(root)).to_table(columns=["id", "path"])
    except Exception as exc:  # noqa: BLE001
        return {"opens": False, "error": f"{exc.__class__.__name__}: {str(exc)[:200]}"}
    paths, ids = t["path"].to_pylist(), t["id"].to_pylist()
    have = set(paths)
    return {"opens": True, "images": len(paths), "acknowledged": len(want),
            "acknowledged_missing": sum(1 for _, p in want if p not in have),
            "acknowledged_duplicate_ids": len(want) - len({i for i, _ in want}),
            "duplicate_paths": len(paths) - len(have), "duplicate_ids": len(ids) - len(set(ids))}


def bench_add(n: int, batch: int, work: Path) -> dict:
    lance, _ = _lance()
    root = work / "add-lance"
    es = bs.entries(bs.load_store("sqlite"), np.random.default_rng(0), n, "a")
    t0 = time.perf_counter()
    cat = LanceCatalog.create(root)
    for i in range(0, n, batch):
        cat.add(es[i:i + batch])
    t_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = lance.dataset(str(root))
    vecs = ds.to_table(columns=["vector"])["vector"].combine_chunks().flatten().to_numpy().reshape(-1, 512)
    t_open = time.perf_counter() - t0
    ids = list(range(0, n, max(1, n // 100)))
    t0 = time.perf_counter()
    for i in ids:
        ds.to_table(columns=["fmap"], filter=f"id = {i}")
    t_maps = (time.perf_counter() - t0) / len(ids)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return {"images": n, "batch": batch, "add_s": round(t_add, 3), "images_per_s": round(n / t_add, 1),
            "open_and_read_vectors_s": round(t_open, 3), "map_read_ms": round(t_maps * 1e3, 3),
            "rows": int(len(vecs)), "bytes_on_disk": size, "versions": ds.version}


def run_child(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(p: subprocess.Popen) -> tuple[str, str]:
    try:
        return p.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        return out, err + f"\nkilled after {CHILD_TIMEOUT_S} s"


def bench_kills(kills: int, work: Path, seed: int = 1) -> dict:
    """As bench_store.bench_kills: batches of 8, kill -9 at uniform(0, 0.4) s after the first acknowledgement."""
    root = work / "kill-lance"
    rng = random.Random(seed)
    want: list[tuple[int, str]] = []
    bad = []
    for k in range(kills):
        p = run_child(["--role", "writer", "--root", str(root), "--tag", f"k{k}", "--batches", "1000",
                       "--batch", "8", "--seed", str(k)])
        line = p.stdout.readline()
        time.sleep(rng.uniform(0, 0.4))
        os.kill(p.pid, signal.SIGKILL)
        out, _ = finish(p)
        want += bs.acked(line + out)
        v = verify(root, want)
        if not v["opens"] or v["acknowledged_missing"] or v["duplicate_ids"]:
            bad.append({"kill": k, **v})
    return {"kills": kills, "runs_with_a_problem": len(bad), "first_problems": bad[:3], "final": verify(root, want)}


def bench_concurrent(writers: int, per_writer: int, work: Path) -> dict:
    root = work / "conc-lance"
    LanceCatalog.create(root)
    batch = 10
    t0 = time.perf_counter()
    ps = [run_child(["--role", "writer", "--root", str(root), "--tag", f"w{w}", "--batches",
                     str(per_writer // batch), "--batch", str(batch), "--seed", str(w)]) for w in range(writers)]
    reader = run_child(["--role", "reader", "--root", str(root), "--seconds", str(CHILD_TIMEOUT_S),
                        "--batch", str(batch)])
    want: list[tuple[int, str]] = []
    failed, races = [], 0
    for p in ps:
        out, err = finish(p)
        want += bs.acked(out)
        lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        races += lines[-1]["id_races"] if lines else 0
        if p.returncode != 0:
            failed.append(err.strip().splitlines()[-1][:200] if err.strip() else f"exit {p.returncode}")
    elapsed = time.perf_counter() - t0
    reader.send_signal(signal.SIGTERM)
    out, _ = finish(reader)
    rd = None if not out.strip() else json.loads(out.strip().splitlines()[-1])
    return {"writers": writers, "images_each": per_writer, "elapsed_s": round(elapsed, 2),
            "writers_failed": len(failed), "writer_errors": failed[:3], "id_races_retried": races,
            **verify(root, want), "reader": rd}


def probe_same_key(work: Path) -> dict:
    """Two handles opened on the same version commit the same new id (what two writers do when both read
    max(id) before either commits): does Lance's conflict retry refuse the second commit?"""
    lance, pa = _lance()
    uri = str(work / "probe")
    t = lambda ids, who: pa.table({"id": pa.array(ids, pa.int64()), "path": [who] * len(ids)})  # noqa: E731
    lance.write_dataset(t([0], "base"), uri)
    a, b = lance.dataset(uri), lance.dataset(uri)
    res = {}
    for name, ds, ids in (("first", a, [1, 2]), ("second", b, [2, 3])):
        try:
            r = (ds.merge_insert("id").when_matched_fail().when_not_matched_insert_all()
                 .conflict_retries(20).execute(t(ids, name)))
            res[name] = f"committed {r['num_inserted_rows']} rows"
        except Exception as exc:  # noqa: BLE001 - the answer we are after
            res[name] = f"{exc.__class__.__name__}: {str(exc)[:160]}"
    ids = lance.dataset(uri).to_table()["id"].to_pylist()
    res["ids_after"] = ids
    res["duplicate_ids"] = len(ids) - len(set(ids))
    return res


def sqlite_torn(res: dict) -> dict:
    """bench_store's reader counts views whose records and vectors disagree as ``inconsistent``: the same
    question as Lance's ``torn``; name it so in the side-by-side table."""
    rd = res.get("reader") or {}
    res["reader"] = {**rd, "torn": rd.get("inconsistent")}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", default="main")
    ap.add_argument("--root")
    ap.add_argument("--tag", default="x")
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--per-writer", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="add,kill,concurrent")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "store_lance.json"))
    a = ap.parse_args()
    if a.role == "writer":
        return child_writer(a.root, a.tag, a.batches, a.batch, a.seed)
    if a.role == "reader":
        return child_reader(a.root, a.seconds, a.batch)
    lance, pa = _lance()
    sq = bs.load_store("sqlite")
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.is_file() else {}  # --only re-measures some rows, keeps the rest
    results |= {"machine": f"{os.cpu_count()} CPUs, shared with other agents' jobs while measured (one run)",
               "versions": f"pylance {lance.__version__}, pyarrow {pa.__version__}",
               "workload": "benchmarks/bench_store.py's: R-MAC/VGG16-sized synthetic entries; add in batches of 32; "
                           "kill -9 writers of batches of 8; concurrent writers of batches of 10",
               "lance_commit": "merge_insert('id').when_matched_fail().when_not_matched_insert_all()"
                               ".conflict_retries(20); ids = max(id)+1 read before the commit"}
    only = set(a.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-store-lance-"))
    try:
        results["lance_same_id_probe"] = probe_same_key(work)
        print("lance same-id probe", results["lance_same_id_probe"], flush=True)
        if "add" in only:  # alternating repeats, best of each
            runs = {"sqlite": [], "lance": []}
            for _ in range(a.repeats):
                shutil.rmtree(work / "add-sqlite", ignore_errors=True)
                runs["sqlite"].append(bs.bench_add(sq, "sqlite", a.images, 32, work))
                shutil.rmtree(work / "add-lance", ignore_errors=True)
                runs["lance"].append(bench_add(a.images, 32, work))
            for kind, rs in runs.items():
                best = dict(min(rs, key=lambda r: r["add_s"]))
                best.update(repeats=a.repeats, add_s_all=[r["add_s"] for r in rs],
                            open_and_read_vectors_s=min(r["open_and_read_vectors_s"] for r in rs),
                            map_read_ms=min(r["map_read_ms"] for r in rs))
                results.setdefault(kind, {})["add"] = best
                print(kind, "add", best, flush=True)
        if "kill" in only:
            results.setdefault("sqlite", {})["kill9"] = bs.bench_kills(sq, "sqlite", a.kills, work)
            print("sqlite kill -9", results["sqlite"]["kill9"], flush=True)
            results.setdefault("lance", {})["kill9"] = bench_kills(a.kills, work)
            print("lance kill -9", results["lance"]["kill9"], flush=True)
        if "concurrent" in only:
            results.setdefault("sqlite", {})["concurrent_writers"] = sqlite_torn(
                bs.bench_concurrent(sq, "sqlite", a.writers, a.per_writer, work, read=True))
            print("sqlite concurrent", results["sqlite"]["concurrent_writers"], flush=True)
            results.setdefault("lance", {})["concurrent_writers"] = bench_concurrent(a.writers, a.per_writer, work)
            print("lance concurrent", results["lance"]["concurrent_writers"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
