"""The import directions of docs/ARCHITECTURE.md, read from the source: the core imports neither executor;
the engine and the swarm import the core (and the config root), never each other; the library never
imports the launcher (only the command line does, for ``checkfree swarm``)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "checkfree"

# package -> the checkfree/launcher packages its modules may import
ALLOWED = {
    "checkfree.core": {"checkfree.core"},
    "checkfree.engine": {"checkfree.core", "checkfree.engine", "checkfree.config", "checkfree"},
    "checkfree.swarm": {"checkfree.core", "checkfree.swarm", "checkfree.config", "checkfree"},
    "checkfree.config": {"checkfree.core", "checkfree.swarm.config"},
    "checkfree.plot": {"checkfree.core"},
    # results of runs, read, and sweeps run as subprocesses (their configs resolved to compare); figures drawn
    # with the shared plot helper; no executor
    "checkfree.analysis": {"checkfree.core", "checkfree.analysis", "checkfree.config", "checkfree.plot", "checkfree"},
    "checkfree.cli": {"*"},  # the entry point may use everything, the launcher included
}  # "checkfree" alone: the package's own __init__ (its __version__), not everything under it


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return [n for n in names if n.split(".")[0] in ("checkfree", "launcher")]


def _allowed(module: str) -> set[str]:
    rule = max((k for k in ALLOWED if module == k or module.startswith(k + ".")), key=len, default=None)
    assert rule is not None, f"{module} belongs to no layer of docs/ARCHITECTURE.md; add it to ALLOWED"
    return ALLOWED[rule]


def _permitted(imported: str, allowed: set[str]) -> bool:
    if "*" in allowed:
        return True
    if imported == "checkfree":
        return "checkfree" in allowed
    return any(imported == a or imported.startswith(a + ".") for a in allowed - {"checkfree"})


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path):
    module = _module_name(path)
    if module == "checkfree":
        return
    allowed = _allowed(module)
    bad = [i for i in _imports(path) if not _permitted(i, allowed)]
    assert not bad, f"{module} imports {bad}; allowed: {sorted(allowed)} (docs/ARCHITECTURE.md)"


def test_the_rule_catches_a_wrong_import(tmp_path):
    """The check itself: an engine module importing the swarm is refused."""
    allowed = _allowed("checkfree.engine.trainer")
    assert not _permitted("checkfree.swarm.peer", allowed) and not _permitted("launcher.local", allowed)
    assert _permitted("checkfree.core.model", allowed) and _permitted("checkfree.config", allowed)
    assert not _permitted("checkfree.engine.pipeline", _allowed("checkfree.core.rebuild"))
    assert not _permitted("checkfree.swarm.membership", _allowed("checkfree.config"))


def test_the_documented_event_schema_is_the_one_in_the_code():
    from checkfree.core.events import schema_table

    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    documented = doc.split("<!-- schema:begin -->")[1].split("<!-- schema:end -->")[0].strip()
    assert documented == schema_table()


def test_the_documented_metrics_schema_is_the_one_in_the_code():
    from checkfree.core.metrics import schema_table

    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    documented = doc.split("<!-- metrics-schema:begin -->")[1].split("<!-- metrics-schema:end -->")[0].strip()
    assert documented == schema_table()


def test_the_documented_state_diagram_is_the_transition_table():
    from checkfree.swarm.states import diagram

    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    documented = doc.split("<!-- states:begin -->")[1].split("<!-- states:end -->")[0].strip()
    assert documented == "```mermaid\n" + diagram() + "```"


def test_the_command_line_and_the_analysis_start_without_torch():
    """``checkfree --help``, ``status`` and the analysis scripts' cost model load no torch (2 s of start-up on
    these machines): the strategy names they need live in ``checkfree.core.strategies``."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from checkfree.cli import build_parser\n"
        "import checkfree.analysis.costmodel, checkfree.analysis.null_predictor\n"
        "build_parser()\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_no_script_imports_another(path):
    """Scripts are thin command lines over the library: what two of them share lives in checkfree/ or
    launcher/ (issue 22)."""
    siblings = {p.stem for p in SCRIPTS} - {path.stem}
    assert not _top_level_imports(path) & siblings, f"{path.name} imports {_top_level_imports(path) & siblings}"


def test_no_test_loads_a_script_as_a_module():
    """Tests run scripts as programs (a subprocess), never import them: a script's code that a test needs
    belongs in the library."""
    scripts = {p.stem for p in SCRIPTS}
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path == Path(__file__).resolve():  # the words it looks for
            continue
        text = path.read_text()
        if "spec_from_file_location" in text or "runpy" in text or _top_level_imports(path) & scripts:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
