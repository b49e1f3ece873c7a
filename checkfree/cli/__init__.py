"""
Command line
============

- ``checkfree prepare INPUT ... --out DIR``: text or JSONL to token shards.
- ``checkfree train [CONFIG.yaml ...] [key=value ...]``: train with the single-process engine (resumes).
- ``checkfree plot RUN_DIR ...``: their losses; ``checkfree config show``: the resolved config and each key's doc.
- ``checkfree export RUN_DIR``: a Hugging Face model; ``checkfree generate RUN_DIR``: sample from it.
- ``checkfree swarm``: a multi-process swarm here; ``checkfree peer``: one peer anywhere; ``checkfree status``.

``--help`` on each explains it. Each subcommand lives in a module of this package with a
``register(sub, common)`` that adds its parser; ``common`` holds the options every subcommand accepts.
"""

from __future__ import annotations

import argparse
import logging
import sys

from checkfree import __version__
from checkfree.cli import config, export, prepare, status, swarm, train
from checkfree.core.exit_codes import describe

COMMANDS = (prepare, train, config, export, swarm, status)  # in the order --help lists them
LOG_LEVELS = ("debug", "info", "warning", "error")


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the subcommand (``checkfree -v train`` and ``checkfree train -v``).
    The subcommands' copy has no defaults (SUPPRESS), so a value given before the subcommand survives."""
    common = argparse.ArgumentParser(add_help=False)
    default = None if defaults else argparse.SUPPRESS
    common.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    common.add_argument(
        "--log-level", choices=LOG_LEVELS, default=default, help="log level (default warning; -v means debug)"
    )
    return common


def _setup_logging(ns: argparse.Namespace) -> None:
    level = "debug" if ns.verbose else (ns.log_level or "warning")
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="checkfree",
        description="Pipeline-parallel training that survives "
        "lost stages without checkpoints (CheckFree / CheckFree+).",
        epilog="exit codes (checkfree train, swarm and peer):\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common_options(defaults=True)],
    )
    parser.add_argument("--version", action="version", version=f"checkfree {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = _common_options(defaults=False)
    for module in COMMANDS:
        module.register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    _setup_logging(ns)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
