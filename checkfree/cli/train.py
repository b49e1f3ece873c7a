"""
``checkfree train`` and ``checkfree plot``
==========================================

Training with the single-process engine, and plots of finished runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from checkfree.core.exit_codes import ExitCode

TRAIN_HELP = """\
Train a pipeline-parallel LLaMa with every stage in this process, injecting stage failures and
recovering from them with the configured strategy.

Arguments are YAML config files (merged in order over the built-in defaults) and key=value overrides
(applied last), e.g.

  checkfree train                                   # the tiny default: 4 stages, CheckFree+, failures on
  checkfree train configs/small.yaml num_steps=100
  checkfree train recovery.strategy=checkfree failures.per_step_prob=0.01 failures.mode=per_step
  checkfree train recovery.strategy=none failures.mode=none run_name=reference

Strategies: none, checkfree, checkfree_plus, copy, uniform, random, checkpoint, redundant.
The run directory (OUT_DIR/RUN_NAME, default runs/tiny) receives config.yaml, metrics.jsonl,
events.jsonl, trace.jsonl (replay with failures.mode=trace failures.trace_path=...), summary.json and
loss.png.
"""

PLOT_HELP = """\
Plot loss against step and against training wall-clock for one or more run directories, overlaid,
with failures marked. Writes a PNG (default: RUN_DIR/loss.png of the first run).
"""


def cmd_train(ns: argparse.Namespace) -> int:
    from checkfree.config import ConfigError, load_config, split_args
    from checkfree.core.data import DataError
    from checkfree.engine.progress import Progress
    from checkfree.engine.trainer import Trainer

    files, overrides = split_args(ns.args)
    try:
        cfg = load_config(files, overrides)
        trainer = Trainer(cfg)
    except (ConfigError, DataError, FileExistsError, ValueError) as e:
        print(f"checkfree train: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    from checkfree.core.stage_step import NonFiniteSteps

    try:
        with Progress(cfg.num_steps, enabled=cfg.progress) as progress:
            summary = trainer.run(on_step=progress.update)
    except NonFiniteSteps as e:
        print(f"checkfree train: stopped: {e} (run directory {trainer.run_dir})", file=sys.stderr)
        return ExitCode.DIVERGED
    if cfg.plot:
        from checkfree.plot import plot_runs

        plot_runs([trainer.run_dir], trainer.run_dir / "loss.png")
    print(
        f"done: {summary['steps']} steps in {summary['train_s']:.1f} s, loss {summary['first_train_loss']:.3f} -> "
        f"{summary['final_train_loss']:.3f} (val {summary['final_val_loss']:.3f}), "
        f"{summary['failures']} failures, {summary['recoveries']} recoveries; run directory {trainer.run_dir}"
    )
    return ExitCode.OK


def cmd_plot(ns: argparse.Namespace) -> int:
    from checkfree.plot import plot_runs

    out = ns.out or Path(ns.run_dirs[0]) / "loss.png"
    try:
        path = plot_runs(ns.run_dirs, out, ns.labels)
    except FileNotFoundError as e:
        print(f"checkfree plot: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    print(f"wrote {path}")
    return ExitCode.OK


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    train = sub.add_parser(
        "train",
        parents=[common],
        help="train with the single-process engine",
        description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value")
    train.set_defaults(func=cmd_train)
    plot = sub.add_parser("plot", parents=[common], help="plot one or more runs", description=PLOT_HELP)
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", help="PNG to write (default: RUN_DIR/loss.png of the first run)")
    plot.add_argument("--labels", nargs="+", help="one legend label per run directory")
    plot.set_defaults(func=cmd_plot)
