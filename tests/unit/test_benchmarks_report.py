"""checkfree.analysis.benchmarks: every command on the benchmarks page is an argument list, run without a
shell, that names a script under scripts/ whose own parser accepts it; every link in the docs resolves.

A script is never imported here (issue 22: no test loads a script). Its parser is rebuilt from the
``add_argument`` calls in its source (``ast``): the option strings, ``nargs``, ``action``, ``required``,
``choices`` and ``int``/``float`` types it declares; what is not a literal (a default computed from a
constant, a help string built at run time) is left out, as it does not decide what the parser accepts.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import sys
import time
from functools import cache
from pathlib import Path

import pytest

from checkfree.analysis import benchmarks as bm

ROOT = Path(__file__).resolve().parents[2]
ENTRIES = {
    **{f"COMMANDS[{k}]": c for k, c in bm.COMMANDS.items()},
    **{f"QUICK[{k}]": c for k, c in bm.QUICK.items()},
    **{f"ANALYSES[{k}]": c for k, c in bm.ANALYSES.items()},
}
KEYWORDS = ("nargs", "action", "required", "choices", "type", "dest", "metavar")  # what decides a parse
TYPES = {"int": int, "float": float, "str": str}


class _Refused(Exception):
    """The rebuilt parser refused the arguments (argparse would exit)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise _Refused(message)


def _literal_keywords(call: ast.Call) -> dict:
    out = {}
    for kw in call.keywords:
        if kw.arg not in KEYWORDS:
            continue
        if kw.arg == "type":
            if isinstance(kw.value, ast.Name) and kw.value.id in TYPES:
                out["type"] = TYPES[kw.value.id]
            continue
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            continue  # computed at run time: choices from a constant, say; the parse is then looser
    return out


@cache
def parser_of(script: Path) -> argparse.ArgumentParser:
    """The parser ``script`` declares, rebuilt from its ``add_argument`` calls (with subcommands:
    ``_subcommand_parser``).

    Raises:
        AssertionError: the script declares no argument at all (rebuild it another way).
    """
    tree = ast.parse(script.read_text(), filename=str(script))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    if any(c.func.attr == "add_subparsers" for c in calls):
        return _subcommand_parser(script, tree)
    parser = _Parser(prog=script.name, add_help=False)
    added = 0
    for call in sorted((c for c in calls if c.func.attr == "add_argument"), key=lambda c: (c.lineno, c.col_offset)):
        names = [ast.literal_eval(a) for a in call.args]
        parser.add_argument(*names, **_literal_keywords(call))
        added += 1
    assert added or "argparse" not in script.read_text(), f"{script.name}: no add_argument found"
    return parser


def _subcommand_parser(script: Path, tree: ast.Module) -> argparse.ArgumentParser:
    """A parser with subcommands, rebuilt statement by statement in source order, each call bound to the
    variable it was made on: ``P = argparse.ArgumentParser(...)``, ``S = P.add_subparsers(...)``,
    ``C = S.add_parser("name", parents=[P, ...])`` and ``P.add_argument(...)``."""
    parsers: dict[str, argparse.ArgumentParser] = {}
    subparsers: dict[str, argparse._SubParsersAction] = {}
    top = None
    stmts = [n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.Expr)) and isinstance(n.value, ast.Call)]
    for stmt in sorted(stmts, key=lambda n: (n.lineno, n.col_offset)):
        call, target = stmt.value, getattr(stmt.targets[0], "id", None) if isinstance(stmt, ast.Assign) else None
        if not isinstance(call.func, ast.Attribute):
            continue
        owner = call.func.value.id if isinstance(call.func.value, ast.Name) else None
        if call.func.attr == "ArgumentParser" and target:
            parsers[target] = _Parser(prog=script.name, add_help=False)
        elif call.func.attr == "add_subparsers" and owner in parsers and target:
            kw = {k: v for k, v in _literal_keywords(call).items() if k in ("dest", "required")}
            subparsers[target], top = parsers[owner].add_subparsers(**kw), parsers[owner]
        elif call.func.attr == "add_parser" and owner in subparsers and target:
            parents = next((k.value for k in call.keywords if k.arg == "parents"), ast.List(elts=[]))
            named = [parsers[e.id] for e in parents.elts]
            name = ast.literal_eval(call.args[0])
            parsers[target] = subparsers[owner].add_parser(name, parents=named, add_help=False)
        elif call.func.attr == "add_argument" and owner in parsers:
            names = [ast.literal_eval(a) for a in call.args]
            parsers[owner].add_argument(*names, **_literal_keywords(call))
    assert top is not None, f"{script.name}: add_subparsers on no parser this rebuild knows"
    return top


def parse(command: bm.Command) -> argparse.Namespace:
    return parser_of(ROOT / command.argv[1]).parse_args(command.argv[2:])


@pytest.mark.parametrize("name", ENTRIES)
def test_command_is_an_argument_list_its_script_accepts(name):
    command = ENTRIES[name]
    assert isinstance(command.argv, list) and all(isinstance(a, str) for a in command.argv)
    assert command.argv[0] == "python"
    script = ROOT / command.argv[1]
    assert script.parent == ROOT / "scripts" and script.is_file(), command.argv[1]
    for arg in command.argv[2:]:
        if arg.endswith(".yaml"):
            assert (ROOT / arg).is_file(), f"{name}: no config {arg}"
    assert not any(a.startswith("(") or a.endswith(")") for a in command.argv), f"{name}: a note in the command"
    try:
        parse(command)
    except _Refused as e:
        pytest.fail(f"{script.name} refuses {shlex.join(command.argv[2:])}: {e}")


@pytest.mark.parametrize("name", ENTRIES)
def test_the_page_shows_the_command_that_runs(name):
    command = ENTRIES[name]
    assert shlex.split(command.shown()) == [*(f"{k}={v}" for k, v in command.env.items()), *command.argv]
    assert not command.provenance or command.provenance not in command.shown()


def test_the_rebuilt_parser_refuses_what_the_script_would():
    whatif = bm.Command(["python", "scripts/whatif.py", "map", "--q", "40"])
    assert parse(whatif).q == [40.0] and parse(whatif).command == "map"
    refused = (["map", "--no-such-flag"], ["map", "--map-rates", "0.1", "0.2"], ["map", "--q", "forty"], ["--q", "40"])
    for argv in (*refused, ["replay", "--q", "40", "runs/a"], ["null"], ["fit-overlap", "runs"]):
        with pytest.raises(_Refused):
            parse(bm.Command(["python", "scripts/whatif.py", *argv]))


def test_a_reanalysis_entry_runs_after_the_benchmarks():
    assert [c.argv[1] for c in bm.ANALYSES.values()] == ["scripts/reanalyse.py", "scripts/choose_swap_fraction.py"]
    assert not set(bm.ANALYSES) & set(bm.COMMANDS)


def test_select_keeps_the_registry_order_and_refuses_unknown_names():
    names = list(bm.COMMANDS)
    assert list(bm.select(bm.COMMANDS, [names[2], names[0]])) == [names[0], names[2]]
    assert bm.select(bm.COMMANDS, None) == {n: c for n, c in bm.COMMANDS.items() if not c.only_when_named}
    assert bm.select(bm.COMMANDS, ["reanalysis"]) == {}
    with pytest.raises(ValueError, match="no_such_benchmark"):
        bm.select(bm.COMMANDS, ["no_such_benchmark"])


def test_a_group_selects_its_entries_in_both_lists():
    assert list(bm.select(bm.COMMANDS, ["swap_tax"])) == [n for n in bm.GROUPS["swap_tax"] if n in bm.COMMANDS]
    assert list(bm.select(bm.ANALYSES, ["swap_tax"])) == ["swap_fraction_choice"]
    assert all(n in bm.COMMANDS or n in bm.ANALYSES for names in bm.GROUPS.values() for n in names)


def test_rerun_runs_argument_lists_with_this_interpreter_from_the_root():
    calls = []
    commands = {
        "a": bm.Command(["python", "scripts/whatif.py", "--q", "40"]),
        "b": bm.Command(["python", "scripts/bench_scaling.py"], env={"OMP_NUM_THREADS": "1"}),
    }
    bm.rerun(commands, timeout_s=5.0, runner=lambda argv, **kw: calls.append((argv, kw)))
    assert [argv for argv, _ in calls] == [
        [sys.executable, "scripts/whatif.py", "--q", "40"],
        [sys.executable, "scripts/bench_scaling.py"],
    ]
    for _, kw in calls:
        assert kw["check"] is True and kw["cwd"] == bm.ROOT and kw["timeout"] == 5.0 and "shell" not in kw
    assert calls[0][1]["env"] is None and calls[1][1]["env"]["OMP_NUM_THREADS"] == "1"


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation but hyphens and underscores dropped,
    spaces made hyphens, a repeated heading numbered."""
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"```.*?```", "", page.read_text(), flags=re.S).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return out


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_in_the_docs_resolves(page):
    """Each link's file exists and, where it names a heading of a markdown page, that heading does."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold commands, not links
    missing = []
    for target, anchor in re.findall(r"\]\(([^)\s#]*)(?:#([^)]*))?\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path = page.parent / target if target else page
        if not path.exists():
            missing.append(target)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            missing.append(f"{target}#{anchor}")
    assert not missing, f"{page.relative_to(ROOT)} links to missing files or headings: {missing}"


def test_the_anchor_rule_is_githubs(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# A title\n## The paper's Fig. 2 (failures.neighbour_prob=0.5)\n## Notes\n## Notes\n")
    assert _anchors(page) == {"a-title", "the-papers-fig-2-failuresneighbour_prob05", "notes", "notes-1"}


def test_no_temporary_files_in_the_docs():
    assert not [p for p in (ROOT / "docs").rglob("*") if "tmp" in p.name.lower()]


def test_only_what_this_run_wrote_is_copied(tmp_path):
    bench = tmp_path / "runs" / "bench"
    (bench / "soak").mkdir(parents=True)
    (bench / "old.json").write_text("{}")  # an earlier run's result, left in runs/bench
    (bench / "soak" / "soak.json").write_text("{}")
    since = time.time() + 10
    for f in (bench / "old.json", bench / "soak" / "soak.json"):
        os.utime(f, (since - 100, since - 100))
    (bench / "new.json").write_text("{}")
    os.utime(bench / "new.json", (since + 1, since + 1))
    soak = bm.Command(["python", "scripts/soak.py"], results={"runs/bench/soak/soak.json": "soak_x.json"})
    with pytest.raises(FileNotFoundError, match=r"soak_x: runs/bench/soak/soak.json"):  # stale: not this run's
        bm.fresh_results({"soak_x": soak}, bench, since, root=tmp_path)
    os.utime(bench / "soak" / "soak.json", (since + 2, since + 2))
    fresh = bm.fresh_results({"soak_x": soak}, bench, since, root=tmp_path)
    assert fresh == {bench / "new.json": "new.json", bench / "soak" / "soak.json": "soak_x.json"}
    gone = bm.Command(["python", "scripts/soak.py"], results={"runs/none/soak.json": "soak_y.json"})
    with pytest.raises(FileNotFoundError, match=r"soak_y: runs/none/soak.json"):
        bm.fresh_results({"soak_y": gone}, bench, since, root=tmp_path)


def test_a_plain_run_leaves_out_the_entries_that_need_root():
    assert bm.COMMANDS["multihost_scenario"].only_when_named
    assert "multihost_scenario" not in bm.select(bm.COMMANDS, None)
    assert list(bm.select(bm.COMMANDS, ["multihost_scenario"])) == ["multihost_scenario"]


def test_the_quick_sweep_never_writes_where_docs_results_are_copied_from():
    for command in bm.QUICK.values():
        out = command.argv[command.argv.index("--out") + 1]
        assert out.startswith("runs/bench/quick/"), out


def test_every_result_a_command_names_is_a_versioned_result_file():
    for name, command in bm.COMMANDS.items():
        for source, dest in command.results.items():
            assert source.startswith("runs/bench/") and (ROOT / "docs" / "results" / dest).is_file(), (name, dest)
