"""README.md and docs/**/*.md: every command and snippet is either run here or says why not, and every file
they cite exists.

Convention (one line directly above each ```bash / ```sh / ```console / ```python block):
    <!-- run -->                   run by this test, in a fresh folder per page holding `photos/` (8 UKBench
                                   photos, 2 objects; shared by all pages: do not change it), `query.jpg` (a copy of
                                   a view of object 1) and `demo-index/` (those photos indexed with R-MAC, VGG16,
                                   256 px; a fresh copy per page); a page's blocks run in order in that folder, so
                                   a later block sees what an earlier one made;
    <!-- not run: REASON -->       not run, REASON says why (e.g. "takes hours", "needs the full Oxford set").
A run bash block holds `isearch ...` lines only (comments allowed, `\\` continues a line); each runs in this
process through typer's test runner and must exit 0. A run python block is exec'd with PHOTOS, QUERY and
INDEX_DIR (a new folder) defined.
"""
from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
CHECKED_LANGS = {"bash", "sh", "shell", "console", "python"}
MARKER = re.compile(r"<!--\s*(run|not run:\s*(?P<reason>.*?))\s*-->\s*$")
FENCE = re.compile(r"^```(\S*)[^\n]*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # "run", "not run", or None (unmarked)
    reason: str

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def parse_blocks(text: str, page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown text with the marker comment on the line above each."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1).lower()
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if j == len(lines):
            raise AssertionError(f"{page}:{start + 1}: code block never closed")
        prev = lines[start - 1] if start else ""
        mk = MARKER.search(prev)
        marker = None if mk is None else ("run" if mk.group(1) == "run" else "not run")
        reason = (mk.group("reason") or "") if mk else ""
        blocks.append(Block(page, start + 1, lang, "\n".join(lines[start + 1:j]), marker, reason.strip()))
        i = j + 1
    return blocks


def all_blocks() -> list[Block]:
    return [b for p in PAGES for b in parse_blocks(p.read_text(), p)]


def isearch_commands(code: str) -> list[list[str]]:
    """The argument lists of a run bash block; anything but an `isearch` command is an error."""
    joined = re.sub(r"\\\n", " ", code)
    cmds = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        if argv[0] != "isearch":
            raise AssertionError(f"a run bash block may only hold isearch commands, got: {line.strip()!r}")
        cmds.append(argv[1:])
    return cmds


# --- the parser itself (so that a broken parser cannot make the checks below vacuous) -----------------------

def test_parser_reads_markers_and_rejects_shell_in_run_blocks():
    text = ("<!-- run -->\n```bash\nisearch info --index x   # note\n```\n\n"
            "<!-- not run: takes hours -->\n```python\nprint(1)\n```\n\n```bash\nls\n```\n\n```text\nfree\n```\n")
    b = parse_blocks(text, Path("x.md"))
    assert [(x.lang, x.marker, x.reason) for x in b] == [
        ("bash", "run", ""), ("python", "not run", "takes hours"), ("bash", None, ""), ("text", None, "")]
    assert isearch_commands(b[0].code) == [["info", "--index", "x"]]
    assert isearch_commands("isearch a \\\n  --b c\n") == [["a", "--b", "c"]]
    with pytest.raises(AssertionError, match="only hold isearch"):
        isearch_commands("isearch info\nrm -rf x\n")
    assert anchors("# A\n```bash\n# not a heading\n```\n### Fast AML (`--rerank aml-fast`)\n## Sec. 7: maps\n") == {
        "a", "fast-aml---rerank-aml-fast", "sec-7-maps"}
    assert PATH_RE.findall("see `src/a/b.py`, benchmarks/results/*.json and docs/x.md.") == [
        "src/a/b.py", "benchmarks/results/*.json", "docs/x.md"]


# --- every block is marked, every run block runs --------------------------------------------------------------

def test_pages_exist_and_have_blocks():
    names = {p.relative_to(REPO).as_posix() for p in PAGES}
    for need in ["README.md", "docs/results.md", "docs/reliability.md", "docs/scale-out.md", "docs/weights.md",
                 *(f"docs/papers/{p}.md" for p in ("tolias", "ng", "hoang", "gordo", "salvador"))]:
        assert need in names, f"{need} is missing"
    assert sum(b.marker == "run" for b in all_blocks()) >= 5


def test_every_command_block_is_run_or_says_why_not():
    bad = [f"{b.where()}: ```{b.lang} block has no <!-- run --> / <!-- not run: REASON --> line above it"
           for b in all_blocks() if b.lang in CHECKED_LANGS and b.marker is None]
    bad += [f"{b.where()}: 'not run' needs a reason" for b in all_blocks()
            if b.marker == "not run" and len(b.reason) < 8]
    bad += [f"{b.where()}: a run block must be bash or python, not {b.lang!r}" for b in all_blocks()
            if b.marker == "run" and b.lang not in {"bash", "python"}]
    bad += [f"{b.where()}: a block of commands needs a language (```bash) and a marker" for b in all_blocks()
            if b.lang not in CHECKED_LANGS and re.search(r"^\s*(isearch|python|\.venv/|curl|pip) ", b.code, re.M)]
    assert not bad, "\n".join(bad)


def test_no_indented_commands():
    """Commands belong in fenced, marked blocks; an indented `isearch ...` line escapes the checks."""
    bad = []
    for p in PAGES:
        inside = False
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if line.startswith("```"):
                inside = not inside
            elif not inside and re.match(r"^( {4}|\t)\s*(isearch|python|curl|\.venv/)", line):
                bad.append(f"{p.relative_to(REPO)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


@pytest.fixture(scope="session")
def sandbox_template(ukbench, tmp_path_factory) -> Path:
    """photos/ (UKBench 0-7: two objects), query.jpg (UKBench 5, object 1) and demo-index/ (photos/ indexed)."""
    from instance_search.collection import Collection
    from instance_search.recipes.base import Recipe

    root = tmp_path_factory.mktemp("docs-sandbox")
    (root / "photos").mkdir()
    for i in range(8):
        shutil.copy(ukbench / f"ukbench{i:05d}.jpg", root / "photos")
    shutil.copy(ukbench / "ukbench00005.jpg", root / "query.jpg")
    col = Collection.create(root / "demo-index", Recipe("rmac", backbone="vgg16", max_size=256), whitening="none")
    report = col.add_folder(root / "photos", progress=False)
    assert len(report.added) == 8 and not report.failed
    return root


RUN_PAGES = sorted({b.page for b in all_blocks() if b.marker == "run"}, key=lambda p: str(p))


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_run_blocks(page, sandbox_template, tmp_path, monkeypatch, capsys):
    from typer.testing import CliRunner

    from instance_search.cli.main import app

    work = tmp_path / "work"
    work.mkdir()
    # photos/ is shared (a link: the index records resolved paths, so `isearch remove photos/x.jpg` finds them);
    # demo-index/ is copied, since a page may change it.
    (work / "photos").symlink_to(sandbox_template / "photos", target_is_directory=True)
    shutil.copy(sandbox_template / "query.jpg", work / "query.jpg")
    shutil.copytree(sandbox_template / "demo-index", work / "demo-index")
    monkeypatch.chdir(work)
    runner = CliRunner()
    for b in parse_blocks(page.read_text(), page):
        if b.marker != "run":
            continue
        if b.lang == "bash":
            for argv in isearch_commands(b.code):
                res = runner.invoke(app, argv)
                assert res.exit_code == 0, f"{b.where()}: isearch {shlex.join(argv)}\n{res.output}\n{res.exception!r}"
        else:
            env = {"INDEX_DIR": work / "python-index", "PHOTOS": work / "photos", "QUERY": work / "query.jpg",
                   "__name__": "__docs__"}
            capsys.readouterr()
            exec(compile(b.code, b.where(), "exec"), env)
            out = capsys.readouterr().out
            if page.name == "README.md":
                check_readme_snippet_output(out)


def check_readme_snippet_output(out: str) -> None:
    """The README's snippet prints `rank score path` for the top 4: the query's object (UKBench 4-7) first."""
    lines = out.strip().splitlines()
    assert len(lines) == 4, out
    obj = [int(Path(line.split()[-1]).stem[-5:]) // 4 for line in lines]
    assert lines[0].startswith("1 ") and obj[0] == 1, out
    assert sum(o == 1 for o in obj) >= 3, out


# --- cited files and modules exist ----------------------------------------------------------------------------

PATH_RE = re.compile(r"(?<![\w/.-])((?:src|benchmarks|tests|docs)/[\w./*-]*[\w*])")
MODULE_RE = re.compile(r"(?<![\w.])(instance_search(?:\.\w+)+)")


# Folders the benchmarks create (gitignored): cited as where a script writes, not expected in a clean clone.
GENERATED = ("benchmarks/cache",)


def cited_paths() -> list[tuple[Path, str]]:
    out = []
    for p in PAGES:
        for m in PATH_RE.finditer(p.read_text()):
            if not m.group(1).startswith(GENERATED):
                out.append((p, m.group(1)))
    return out


def test_cited_paths_exist():
    cited = cited_paths()
    assert len(cited) > 50
    missing = []
    for page, rel in cited:
        if "*" in rel:
            ok = any(REPO.glob(rel))
        else:
            ok = (REPO / rel).exists()
        if not ok:
            missing.append(f"{page.relative_to(REPO)}: {rel}")
    assert not missing, "cited but missing:\n" + "\n".join(sorted(set(missing)))


def test_cited_modules_and_names_exist():
    """`instance_search.a.b.Name` in the text: the module imports and has the name."""
    import importlib

    bad = []
    for p in PAGES:
        for dotted in set(MODULE_RE.findall(p.read_text())):
            parts = dotted.split(".")
            obj, i = None, len(parts)
            while i > 0:
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                    break
                except ModuleNotFoundError:
                    i -= 1
            for name in parts[i:]:
                if not hasattr(obj, name):
                    bad.append(f"{p.relative_to(REPO)}: {dotted}")
                    break
                obj = getattr(obj, name)
    assert not bad, "cited but missing:\n" + "\n".join(sorted(bad))


def test_relative_links_resolve():
    bad = []
    for p in PAGES:
        text = p.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (p.parent / path).resolve() if path else p
            if not dest.exists():
                bad.append(f"{p.relative_to(REPO)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                bad.append(f"{p.relative_to(REPO)}: {target} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    inside = False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif not inside and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_readme_is_short():
    assert len((REPO / "README.md").read_bytes()) <= 12_000
