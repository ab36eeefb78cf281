"""The package's imports point one way and run in no circle (issue 12, section 2).

:func:`check` parses every module under a source root with :mod:`ast` (imports at module level, inside functions
and classes, relative and absolute), builds the graph "module A imports module B" between the package's own
modules, and reports

* every cycle (one per strongly connected component, printed as a path ``a -> b -> a``);
* every import that points up the layers of :data:`LAYERS`
  (ops <- fitted / nets <- recipes <- index / collection <- search / rerank <- cli / server);
* every ``from X import _name`` of a private name of another module.

Parent packages are not counted as imported (importing ``p.q.r`` runs ``p/__init__`` by Python's rules, not by
the author's choice); ``from p import q`` counts as importing the submodule ``q`` when it is one, else ``p``.
The test runs the checker on the package, and on small hand-made packages to show each rule can fail.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "instance_search"
SRC = Path(__file__).resolve().parents[1] / "src"

# Layer of each module or package (longest dotted prefix wins; names relative to the package). An import may
# point to the same layer or below; a cycle is refused whatever the layers. The order is the guide's
# (ops <- fitted/nets <- recipes <- index/collection <- search/rerank <- cli/server) with three readings:
# rerank/ works on a short list and the maps handed to it (it imports ops/ and nets/, never the collection), and
# collection.py / search.py compose recipe -> index -> rerank -> expansion, so rerank/ sits below them;
# index.distributed drives a Collection's describer over Ray, so it sits with the collection; viz.py (plots,
# used by the CLI) sits with eval/, and demo.py (a CLI command) with the CLI.
LAYERS: dict[str, int] = {
    "errors": 0,
    "io": 1,
    "ops": 2,
    "images": 3,
    "backbones": 3,
    "fitted": 4,
    "nets": 4,
    "recipes": 5,
    "index": 6,
    "rerank": 6,
    "collection": 7,
    "search": 7,
    "index.distributed": 7,
    "eval": 8,
    "train": 8,
    "viz": 8,
    "cli": 9,
    "server": 9,
    "demo": 9,
    "": 9,  # the package's own __init__: the public API, lazily importing from below
}


def _modules(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``src/package`` (``__init__`` names its package)."""
    root = src / package
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no package {package!r} under the source root {src}")
    mods = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path], package: str):
    """Yield ``(line, imported module, private names imported from it)`` for every import of ``name``'s file
    that names a module of the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]

    def owner(dotted: str) -> str | None:  # the longest prefix that is a module of the package
        while dotted:
            if dotted in mods:
                return dotted
            dotted = dotted.rpartition(".")[0]
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == package or a.name.startswith(package + "."):
                    m = owner(a.name)
                    if m:
                        yield node.lineno, m, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here.split(".")
                if node.level - 1 > len(base_parts) - 1:
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
                if not (base == package or base.startswith(package + ".")):
                    continue
            private = []
            targets = set()
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in mods:
                    targets.add(sub)
                else:
                    m = owner(base)
                    if m:
                        targets.add(m)
                        if a.name.startswith("_") and not a.name.startswith("__"):
                            private.append(a.name)
            for t in targets:
                yield node.lineno, t, (private if t == owner(base) else [])


def layer_of(module: str, package: str = PACKAGE, layers: dict[str, int] = LAYERS) -> int:
    rel = module[len(package) + 1:] if module.startswith(package + ".") else ("" if module == package else module)
    key = rel
    while True:
        if key in layers:
            return layers[key]
        if not key:
            raise KeyError(f"module {module}: no layer defined for it or any package above it")
        key = key.rpartition(".")[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # recursion depth <= number of modules (a few hundred)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    out = []
    for comp in comps:  # a shortest closed path through the component's first module (breadth-first)
        members, start = set(comp), comp[0]
        prev: dict[str, str] = {}
        frontier, seen, found = [start], {start}, None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        found = v
                        break
                    if w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(prev[path[-1]])
        out.append(list(reversed(path)) + [start])
    return out


def check(src: str | Path, package: str = PACKAGE, layers: dict[str, int] = LAYERS) -> list[str]:
    """Every layering problem of ``src/package``, one line each (empty: none)."""
    src = Path(src)
    mods = _modules(src, package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    problems = []
    for name, path in mods.items():
        for line, target, private in _imports(name, path, mods, package):
            where = f"{path.relative_to(src)}:{line}"
            if target == name:
                continue
            graph[name].add(target)
            if private:
                problems.append(f"private name: {where} imports {', '.join(private)} from {target}")
            lo, hi = layer_of(name, package, layers), layer_of(target, package, layers)
            if hi > lo:
                problems.append(f"upward import: {where} {name} (layer {lo}) imports {target} (layer {hi})")
    for cyc in _cycles(graph):
        problems.append("cycle: " + " -> ".join(cyc))
    return problems


def test_package_imports_point_down_without_cycles():
    problems = check(SRC)
    assert not problems, "\n" + "\n".join(problems)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_checker_reports_a_cycle_through_function_level_and_absolute_imports(tmp_path):
    src = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/ops/__init__.py": "",
        "pkg/ops/a.py": "def f():\n    from ..recipes import b\n",
        "pkg/recipes/__init__.py": "",
        "pkg/recipes/b.py": "import pkg.recipes.c\n",
        "pkg/recipes/c.py": "from pkg.ops import a\n",
    })
    layers = {"": 9, "ops": 0, "recipes": 1}
    problems = check(src, "pkg", layers)
    assert "cycle: pkg.ops.a -> pkg.recipes.b -> pkg.recipes.c -> pkg.ops.a" in problems
    assert any(p.startswith("upward import: pkg/ops/a.py:2 pkg.ops.a (layer 0) imports pkg.recipes.b")
               for p in problems)
    assert len(problems) == 2, problems


def test_checker_reports_private_names_and_accepts_a_clean_package(tmp_path):
    files = {
        "pkg/__init__.py": "from .top import run\n",
        "pkg/low.py": "def _helper():\n    return 1\n\ndef helper():\n    return 2\n",
        "pkg/top.py": "from .low import helper\nfrom . import low as _low\n\ndef run():\n    return helper()\n",
    }
    layers = {"": 9, "low": 0, "top": 1}
    assert check(_write(tmp_path / "clean", files), "pkg", layers) == []
    files["pkg/top.py"] = "from .low import helper, _helper\n"
    problems = check(_write(tmp_path / "bad", files), "pkg", layers)
    assert problems == ["private name: pkg/top.py:1 imports _helper from pkg.low"]


def test_checker_refuses_a_module_without_a_layer(tmp_path):
    src = _write(tmp_path, {"pkg/__init__.py": "", "pkg/new.py": "from . import old\n", "pkg/old.py": ""})
    with pytest.raises(KeyError, match="pkg.new: no layer"):
        check(src, "pkg", {"old": 0})
