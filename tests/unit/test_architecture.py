"""The import directions of docs/ARCHITECTURE.md, read from the source: the core imports neither executor;
the engine and the swarm import the core (and the config root), never each other; the library never
imports the launcher (only the command line does, for ``checkfree swarm``). Scripts import no other script,
and no test imports or loads a script (issue 22)."""

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
SCRIPT_NAMES = {p.stem for p in SCRIPTS} | {"scripts"}  # ``import soak`` and ``from scripts import soak`` alike
LOADERS = {"runpy", "spec_from_file_location", "SourceFileLoader", "import_module", "load_source"}


def _all_imports(path: Path) -> set[str]:
    """Every module an ``import`` statement in ``path`` names, relative imports left out."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _script_imports(path: Path, scripts: set[str]) -> set[str]:
    return {n for n in _all_imports(path) if n.split(".")[0] in scripts}


def _loads_modules_by_hand(path: Path) -> set[str]:
    """The module loaders ``path`` imports or calls (runpy, importlib's spec_from_file_location...)."""
    tree = ast.parse(path.read_text())
    used = {n.split(".")[-1] for n in _all_imports(path)}
    used |= {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
    used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    used |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return used & LOADERS


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_no_script_imports_another(path):
    """Scripts are thin command lines over the library: what two of them share lives in checkfree/ or
    launcher/ (issue 22)."""
    bad = _script_imports(path, SCRIPT_NAMES - {path.stem})
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_no_test_loads_a_script_as_a_module():
    """Tests run scripts as programs (a subprocess), never import or load them: a script's code that a test
    needs belongs in the library."""
    offenders = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        bad = _script_imports(path, SCRIPT_NAMES) | _loads_modules_by_hand(path)
        if bad and path != Path(__file__).resolve():
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, offenders


def test_the_script_rules_catch_what_they_refuse(tmp_path):
    cases = {
        "import soak\n": {"soak"},
        "from scripts import soak\n": {"scripts"},
        "from scripts.soak import TINY\n": {"scripts.soak"},
        "import checkfree.config\n": set(),
    }
    for source, want in cases.items():
        (tmp_path / "t.py").write_text(source)
        assert _script_imports(tmp_path / "t.py", SCRIPT_NAMES) == want, source
    (tmp_path / "t.py").write_text("import importlib.util\nimportlib.util.spec_from_file_location('s', 'x.py')\n")
    assert _loads_modules_by_hand(tmp_path / "t.py") == {"spec_from_file_location"}
    (tmp_path / "t.py").write_text("from runpy import run_path\n")
    assert _loads_modules_by_hand(tmp_path / "t.py") == {"runpy"}
    (tmp_path / "t.py").write_text("# runpy and spec_from_file_location are only words here\nx = 'runpy'\n")
    assert _loads_modules_by_hand(tmp_path / "t.py") == set()
