"""
``checkfree config``
====================

``checkfree config show [CONFIG.yaml ...] [key=value ...] [--docs]`` prints the resolved config as YAML,
exactly what a run with the same arguments would use (and writes to its run directory); with ``--docs``
each key carries its one-line doc, type and default, read from the comment beside its dataclass field.
"""

from __future__ import annotations

import argparse
import sys

from checkfree.core.exit_codes import ExitCode

CONFIG_HELP = """\
Print the resolved config: the built-in defaults < YAML files (in order) < key=value overrides, as a run
with the same arguments would use it. --docs adds each key's meaning, type and default.

  checkfree config show                         # the tiny default
  checkfree config show configs/small.yaml optim.lr=3e-4 --docs
"""


def cmd_config_show(ns: argparse.Namespace) -> int:
    from checkfree.config import ConfigError, load_config, show, split_args
    from checkfree.core.data import DataError

    files, overrides = split_args(ns.args)
    try:
        cfg = load_config(files, overrides)
    except (ConfigError, DataError) as e:
        print(f"checkfree config show: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    sys.stdout.write(show(cfg, docs=ns.docs))
    return ExitCode.OK


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    config = sub.add_parser("config", parents=[common], help="print the resolved config and every key's doc")
    actions = config.add_subparsers(dest="action", required=True)
    show = actions.add_parser(
        "show",
        parents=[common],
        help="the resolved config as YAML",
        description=CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value")
    show.add_argument("--docs", action="store_true", help="each key with its one-line doc, type and default")
    show.set_defaults(func=cmd_config_show)
