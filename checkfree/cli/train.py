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
from checkfree.core.strategies import STRATEGIES

TRAIN_HELP = """\
Train a pipeline-parallel LLaMa with every stage in this process, injecting stage failures and
recovering from them with the configured strategy.

Arguments are YAML config files (merged in order over the built-in defaults) and key=value overrides
(applied last), e.g.

  checkfree train                                   # the tiny default: 4 stages, CheckFree+, failures on
  checkfree train configs/small.yaml num_steps=100
  checkfree train recovery.strategy=checkfree failures.per_step_prob=0.01 failures.mode=per_step
  checkfree train recovery.strategy=none failures.mode=none run_name=reference

Strategies: {strategies}.
The run directory (OUT_DIR/RUN_NAME, default runs/tiny) receives config.yaml, metrics.jsonl,
events.jsonl, trace.jsonl (replay with failures.mode=trace failures.trace_path=...), summary.json,
model.safetensors (the trained weights; checkfree export / generate use them) and loss.png.

Resume: run the same command again. Ctrl-C or SIGTERM stops at the next step boundary and saves what a
resume needs (exit 130; Ctrl-C twice aborts at once); with checkpoint.every_steps=N the state is also
saved every N steps in the background, so even a killed run continues from its newest save. resume=never
refuses an existing run directory; overwrite=true deletes it and its checkpoints (and says which).
Every key: checkfree config show --docs.
""".format(strategies=", ".join(STRATEGIES))

PLOT_HELP = """\
Plot loss against step and against training wall-clock for one or more run directories, overlaid,
with failures marked. Writes a PNG (default: RUN_DIR/loss.png of the first run).
"""


def cmd_train(ns: argparse.Namespace) -> int:
    from checkfree.cli.stopping import GracefulStop
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
    except (RuntimeError, OSError) as e:  # an unreadable checkpoint or resume state, unusable storage: named
        print(f"checkfree train: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    from checkfree.core.stage_step import NonFiniteSteps

    try:
        with GracefulStop(trainer.request_stop), Progress(cfg.num_steps, enabled=cfg.progress) as progress:
            summary = trainer.run(on_step=progress.update)
    except NonFiniteSteps as e:
        print(f"checkfree train: stopped: {e} (run directory {trainer.run_dir})", file=sys.stderr)
        return ExitCode.DIVERGED
    except KeyboardInterrupt:
        print(
            f"checkfree train: aborted at step {trainer.state.step}; the newest saved state in {trainer.ckpt_root} "
            "is kept: run the same command to continue from it",
            file=sys.stderr,
        )
        return ExitCode.INTERRUPTED
    except OSError as e:  # a full disk or a refused write while saving: what was saved before is intact
        print(
            f"checkfree train: {e}; stopped at step {trainer.state.step}. Saved states and weights written before "
            "are intact: free space (or fix the storage) and run the same command to continue",
            file=sys.stderr,
        )
        return ExitCode.BAD_INPUT
    if cfg.plot:
        from checkfree.plot import plot_runs

        plot_runs([trainer.run_dir], trainer.run_dir / "loss.png")
    print(_done_line(summary, trainer.run_dir))
    if summary["stopped"]:
        print(
            f"stopped by {summary['stopped']} at step {summary['steps']}: run the same command to continue",
            file=sys.stderr,
        )
        return ExitCode.INTERRUPTED
    return ExitCode.OK


def _done_line(summary: dict, run_dir: Path) -> str:
    num = lambda x: "-" if x is None else f"{x:.3f}"
    resumed = f" (resumed at step {summary['resumed_from']})" if summary.get("resumed_from") is not None else ""
    return (
        f"{'stopped' if summary['stopped'] else 'done'}: {summary['steps']} steps{resumed} in "
        f"{summary['train_s']:.1f} s, loss {num(summary['first_train_loss'])} -> {num(summary['final_train_loss'])} "
        f"(val {num(summary['final_val_loss'])}), {summary['failures']} failures, {summary['recoveries']} recoveries; "
        f"weights {summary['weights']}; run directory {run_dir}"
    )


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
