"""scripts/benchmarks_report.py: every command on the page is an argument list that its script's parser
accepts, shown as it runs, and run without a shell."""

from __future__ import annotations

import argparse
import importlib.util
import json
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("benchmarks_report", ROOT / "scripts" / "benchmarks_report.py")
br = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = br  # dataclasses look their module up there
_spec.loader.exec_module(br)

ENTRIES = {
    **{f"COMMANDS[{k}]": c for k, c in br.COMMANDS.items()},
    **{f"QUICK[{k}]": c for k, c in br.QUICK.items()},
    "convergence.json": br.first_convergence_command(json.loads((ROOT / "docs/results/convergence.json").read_text())),
}


class _Parsed(Exception):
    """Raised in place of returning from parse_args: the script stops before doing anything."""


def _parse_only(script: Path, args: list[str], monkeypatch, capsys) -> argparse.Namespace:
    """Run ``script`` as __main__ with ``args`` up to its parser, and return what the parser made of them."""
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    try:
        runpy.run_path(str(script), run_name="__main__")
    except _Parsed as parsed:
        return parsed.args[0]
    except SystemExit as e:
        pytest.fail(f"{script.name} refused {shlex.join(args)}: exit {e.code}: {capsys.readouterr().err}")
    pytest.fail(f"{script.name} returned without parsing its arguments")


@pytest.mark.parametrize("name", ENTRIES)
def test_command_is_an_argument_list_its_script_accepts(name, monkeypatch, capsys):
    command = ENTRIES[name]
    assert isinstance(command.argv, list) and all(isinstance(a, str) for a in command.argv)
    assert command.argv[0] == "python"
    script = ROOT / command.argv[1]
    assert script.parent == ROOT / "scripts" and script.is_file(), command.argv[1]
    for arg in command.argv[2:]:
        if arg.endswith(".yaml"):
            assert (ROOT / arg).is_file(), f"{name}: no config {arg}"
    assert all(not a.startswith("(") for a in command.argv), f"{name}: a note inside the command"
    _parse_only(script, command.argv[2:], monkeypatch, capsys)


@pytest.mark.parametrize("name", ENTRIES)
def test_the_page_shows_the_command_that_runs(name):
    command = ENTRIES[name]
    assert shlex.split(command.shown()) == [*(f"{k}={v}" for k, v in command.env.items()), *command.argv]


def test_section_shows_the_note_after_the_command_not_in_it():
    command = br.Command(["python", "scripts/whatif.py", "--q", "40"], note="seeds moved in by hand")
    line = br._section("t", "x", "body", command=command)[2]
    assert line == "Command: `python scripts/whatif.py --q 40` (seeds moved in by hand)"
    assert br._section("t", "no such benchmark", "body")[2] == "Command: `?`"


def test_rerun_runs_argument_lists_with_this_interpreter_from_the_root():
    calls = []
    commands = {
        "a": br.Command(["python", "scripts/whatif.py", "--q", "40"]),
        "b": br.Command(["python", "scripts/bench_scaling.py"], env={"OMP_NUM_THREADS": "1"}),
    }
    br.rerun(commands, timeout_s=5.0, runner=lambda argv, **kw: calls.append((argv, kw)))
    assert [argv for argv, _ in calls] == [
        [sys.executable, "scripts/whatif.py", "--q", "40"],
        [sys.executable, "scripts/bench_scaling.py"],
    ]
    for _, kw in calls:
        assert kw["check"] is True and kw["cwd"] == br.ROOT and kw["timeout"] == 5.0 and "shell" not in kw
    assert calls[0][1]["env"] is None and calls[1][1]["env"]["OMP_NUM_THREADS"] == "1"
