"""Nothing in src/ runs code hidden in a file or a string: a static scan (the AST of every module) for pickle
loads outside the one restricted unpickler, ``eval``/``exec``/``compile``, ``torch.load`` without
``weights_only=True``, ``np.load(allow_pickle=True)``, ``yaml.load``, ``marshal``, ``shell=True``; the scanner
is itself tested on code that does each of these. Then the same at run time: hostile pickles, ``.pt`` files
and ``.npz`` files handed to the loaders are refused without running anything.
"""
from __future__ import annotations

import ast
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src" / "instance_search"

#: The one place allowed to unpickle: revisitop ground-truth files, through a find_class that refuses classes.
ALLOWED_UNPICKLER = ("datasets/benchmarks.py", "_RestrictedUnpickler")

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
DANGEROUS_BUILTINS = {"eval", "exec", "compile", "__import__", "execfile"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for an attribute chain (``''`` if it is not one)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def scan(source: str, filename: str = "<src>") -> list[str]:
    """Every unsafe loading or code execution in ``source``, as ``file:line: what``."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    aliases: dict[str, str] = {}  # local name -> module (import numpy as np; from torch import load)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def resolve(dotted: str) -> str:
        head, _, rest = dotted.partition(".")
        full = aliases.get(head, head)
        return f"{full}.{rest}" if rest else full

    allowed_lines: set[int] = set()
    if filename.endswith(ALLOWED_UNPICKLER[0]):
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == ALLOWED_UNPICKLER[1]:
                allowed_lines.add(node.lineno)  # the class statement (its base is pickle.Unpickler)
            if isinstance(node, ast.FunctionDef) and node.name == "load_gnd_pickle":
                allowed_lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))

    def report(node: ast.AST, what: str) -> None:
        if node.lineno not in allowed_lines:
            found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                name = resolve(_dotted(base))
                if name.split(".")[0] in PICKLE_MODULES and name.endswith("Unpickler"):
                    if not (filename.endswith(ALLOWED_UNPICKLER[0]) and node.name == ALLOWED_UNPICKLER[1]):
                        report(node, f"unpickler subclass {node.name}")
                    elif not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                        found.append(f"{filename}:{node.lineno}: {node.name} does not restrict find_class")
        if not isinstance(node, ast.Call):
            continue
        name = resolve(_dotted(node.func))
        short = name.rsplit(".", 1)[-1]
        if isinstance(node.func, ast.Name) and node.func.id in DANGEROUS_BUILTINS and node.func.id not in aliases:
            report(node, f"builtin {node.func.id}()")
        elif name in {f"builtins.{b}" for b in DANGEROUS_BUILTINS}:
            report(node, f"{name}()")
        elif name.split(".")[0] in PICKLE_MODULES and short in {"load", "loads", "Unpickler", "open", "_load",
                                                                 "_loads"}:
            report(node, f"{name}()")
        elif name in ("torch.load", "torch.hub.load_state_dict_from_url", "torch.serialization.load"):
            if not _is_true(_kw(node, "weights_only")):
                report(node, f"{name}() without weights_only=True")
        elif name in ("torch.jit.load", "torch.hub.load", "torch.package.PackageImporter"):
            report(node, f"{name}() (loads code)")
        elif name in ("numpy.load", "np.load"):
            if _kw(node, "allow_pickle") is not None and not (isinstance(_kw(node, "allow_pickle"), ast.Constant)
                                                              and _kw(node, "allow_pickle").value is False):
                report(node, f"{name}(allow_pickle=...) not False")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            loader = _kw(node, "Loader")
            if name != "yaml.load" or loader is None or "Safe" not in _dotted(loader):
                report(node, f"{name}() without SafeLoader")
        elif name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
            report(node, f"{name}() (a shell)")
        elif name.startswith("subprocess.") and _is_true(_kw(node, "shell")):
            report(node, f"{name}(shell=True)")
    return found


def test_source_tree_has_no_unsafe_loading():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20, "src/ not found"
    found = [hit for f in files for hit in scan(f.read_text(), f.relative_to(SRC).as_posix())]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("code", [
    "import pickle\npickle.load(open('x', 'rb'))",
    "import pickle as pk\nobj = pk.loads(data)",
    "from pickle import loads\nloads(b'')",
    "import _pickle\n_pickle.Unpickler(f).load()",
    "import joblib\njoblib.load('m.pkl')",
    "import dill\ndill.load(f)",
    "import shelve\nshelve.open('db')",
    "import marshal\nmarshal.loads(b'')",
    "class U(__import__('pickle').Unpickler): pass",
    "import pickle\nclass Mine(pickle.Unpickler):\n    pass",
    "eval('1+1')",
    "exec(text)",
    "code = compile(s, 'f', 'exec')",
    "import builtins\nbuiltins.eval('x')",
    "__import__('os')",
    "import torch\ntorch.load('w.pt')",
    "import torch\ntorch.load('w.pt', weights_only=False)",
    "import torch\ntorch.load('w.pt', map_location='cpu', weights_only=flag)",
    "from torch import load\nload(p)",
    "import torch\ntorch.hub.load_state_dict_from_url(u)",
    "import torch\ntorch.jit.load('m.pt')",
    "import torch\ntorch.hub.load('repo', 'model')",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    "import numpy\nnumpy.load(f, allow_pickle=ok)",
    "import yaml\nyaml.load(s)",
    "import yaml\nyaml.unsafe_load(s)",
    "import os\nos.system('ls')",
    "import subprocess\nsubprocess.run(cmd, shell=True)",
])
def test_scanner_catches(code):
    assert scan(code), code


@pytest.mark.parametrize("code", [
    "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
    "import torch\ntorch.hub.load_state_dict_from_url(u, weights_only=True)",
    "import numpy as np\nnp.load(p)\nnp.load(p, allow_pickle=False, mmap_mode='r')",
    "net.eval()\nmodel.eval().requires_grad_(False)",
    "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)",
    "import json\njson.loads(s)",
    "import subprocess\nsubprocess.run(['npm', 'pack', name], check=True)",
])
def test_scanner_allows(code):
    assert not scan(code), code


# ------------------------------------------------------------------------------------------ at run time
class _Payload:
    """Unpickling this calls ``Path.touch`` on the marker: the canonical pickle exploit, made harmless."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_ground_truth_unpickler_refuses_code(tmp_path):
    from instance_search.eval.datasets.benchmarks import load_gnd_pickle

    marker = tmp_path / "pwned"
    evil = tmp_path / "gnd_evil.pkl"
    evil.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "x": _Payload(marker)}))
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        load_gnd_pickle(evil)
    assert not marker.exists()
    ok = tmp_path / "gnd_ok.pkl"
    ok.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"ok": [0], "junk": []}]}))
    assert load_gnd_pickle(ok)["imlist"] == ["a"]


def test_user_weights_file_is_read_with_weights_only(tmp_path):
    from instance_search.backbones.weights import WeightsError, fetch_weights

    marker = tmp_path / "pwned"
    pt = tmp_path / "evil.pt"
    torch.save({"features.conv1_1.weight": torch.zeros(1), "hook": _Payload(marker)}, pt)
    with pytest.raises(WeightsError, match="weights_only=True"):
        fetch_weights("vgg16", path=str(pt), progress=False)
    assert not marker.exists()


def test_npz_with_pickled_objects_is_refused(tmp_path):
    from instance_search.index.store import CorruptIndexError, load_npz
    from instance_search.fitted.whitening import PCAWhitening

    marker = tmp_path / "pwned"
    bad = tmp_path / "whitening.npz"
    np.savez(bad, mean=np.zeros(3), P=np.array([_Payload(marker)], dtype=object))
    with pytest.raises(Exception) as exc:
        PCAWhitening.load(bad)
    assert "whitening.npz" in str(exc.value) and not marker.exists()
    with pytest.raises(CorruptIndexError, match="whitening.npz"):
        load_npz(bad)
    assert not marker.exists()
