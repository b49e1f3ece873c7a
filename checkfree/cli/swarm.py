"""
``checkfree swarm``, ``checkfree peer`` and ``checkfree status``
================================================================

A whole swarm on this machine, one peer anywhere, and a look at a live swarm.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn

from checkfree.core.exit_codes import ExitCode, describe

SWARM_HELP = """\
Start a whole swarm on this machine: one OS process per stage peer and swarm.num_spares spare peers,
plus this launcher, which shows a live status line and starts a fresh spare swarm.spare_delay_s after each
loss. Failures follow the failures section: by default (swarm.inject=peer) every peer draws the run's
failures itself and dies (SIGKILL, or SIGSTOP for swarm.hang_fraction of them) where the engine's timeline
would stop; swarm.inject=launcher kills from outside; swarm.chaos.events=N lands N events at any moment,
recoveries included. The run directory gets merged metrics.jsonl and events.jsonl, recoveries.jsonl
(detect / rebuild / resume seconds per loss), summary.json and every peer's log under peers/.

  checkfree swarm                                       # the tiny default, failures as configured
  checkfree swarm failures.mode=per_step failures.per_step_prob=0.02 swarm.num_spares=2

Each stage's holder writes its weights part (RUN_DIR/weights) at the end, joined into RUN_DIR/model.safetensors.
Ctrl-C (or SIGTERM) stops every peer at a step boundary with its stage saved (its checkpoint in checkpoint.dir,
default RUN_DIR/checkpoints, and its weights part) and exits 130; a second one aborts at once. The same command
on the same run (resume=auto) goes on from the newest complete checkpoint. With checkpoint.every_steps set every
peer also saves its stage every k steps in the background, so that a swarm whose every process was killed goes
on too. resume=never refuses a run directory that holds a run; overwrite=true deletes it (with the saved steps
of a checkpoint.dir outside it).
"""

PEER_HELP = """\
Start one peer of a swarm, on this host or any other: it joins the DHT through any live peer's
address (--initial-peers takes several; pass all you know; checkfree status lists them), or, without
--initial-peers, starts a new swarm and logs the line the others join with. It either asks for a stage
(--stage K) or waits as a spare (--spare) until the swarm gives it a lost stage.

Addresses: membership.host is the IPv4 address every socket binds (default 127.0.0.1; the host's
address for a multi-host swarm, or 0.0.0.0 with membership.announce_host, the address the others
dial); membership.port_range=LOW-HIGH keeps the DHT, probe and rendezvous ports in a range. gloo's
data plane needs the hosts to reach each other's addresses directly (no NAT). Every peer must use the
same config (model, data, schedule, optimizer, recovery, seed): a peer with another fingerprint is
refused, and a peer with another join token exits 2 saying so.

Ctrl-C: stop at the next step boundary, save the stage (a checkpoint into checkpoint.dir, default
RUN_DIR/checkpoints, and its weights part in RUN_DIR/weights), exit 130; a second Ctrl-C aborts
at once. SIGTERM: leave the swarm, handing the stage to a spare in view (as on a preemption notice), else
saving it as on Ctrl-C; exit 143. Peers started on a run whose checkpoint.dir holds a complete checkpoint
resume from it (resume=auto).
"""

EXIT_HELP = "exit codes (checkfree train, swarm and peer):\n" + describe()


def cmd_swarm(ns: argparse.Namespace) -> int:
    from checkfree.config import ConfigError, load_config, split_args

    files, overrides = split_args(ns.args)
    try:
        cfg = load_config(files, overrides)
    except ConfigError as e:
        print(f"checkfree swarm: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    import torch

    from checkfree.core.devices import check_nccl_roster, cuda_count, peer_device
    from checkfree.swarm.config import check_swarm_config
    from checkfree.swarm.injection import NOT_DETERMINISTIC, deterministic
    from checkfree.swarm.transport import resolve_backend

    try:
        check_swarm_config(cfg)
        gpus = cuda_count()
        for k in range(max(1, len(cfg.swarm.devices))):  # a GPU this host lacks: refused before anything starts
            peer_device(cfg.device, list(cfg.swarm.devices), k, gpus)
        first = [peer_device(cfg.device, list(cfg.swarm.devices), k, gpus) for k in range(cfg.model.num_stages)]
        check_nccl_roster(first, resolve_backend(cfg.transport, torch.device(first[0])))
    except ValueError as e:
        print(f"checkfree swarm: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if cfg.swarm.inject == "peer" and cfg.failures.mode != "none" and not deterministic(cfg.failures):
        print(f"checkfree swarm: {NOT_DETERMINISTIC}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    run_dir = cfg.run_dir
    try:
        refused = prepare_run_dir(cfg)
    except ValueError as e:  # a checkpoint.dir that cannot be opened
        refused = str(e)
    if refused is not None:
        print(f"checkfree swarm: {refused}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    run_dir.mkdir(parents=True, exist_ok=True)
    import signal

    from launcher.local import LocalSwarm
    from launcher.report import recovery_table

    swarm = LocalSwarm(cfg, run_dir, status=cfg.progress)

    def on_signal(signum, frame):  # the first stops every peer at a step boundary; a second aborts at once
        if swarm.stop_signal is not None:
            raise KeyboardInterrupt
        swarm.request_stop(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = swarm.run()
    summary = json.loads((run_dir / "summary.json").read_text())
    if cfg.plot and summary["steps"]:
        from checkfree.plot import plot_runs

        plot_runs([run_dir], run_dir / "loss.png")
    print(recovery_table(summary["recovery_rows"]))
    print(
        f"swarm exit {int(code)} ({ExitCode(code).name.lower()}): {summary['steps']} steps, "
        f"loss {summary['first_train_loss']} -> "
        f"{summary['final_train_loss']}, {summary['failures']} failures, {summary['recoveries']} recoveries, "
        f"repeated steps {summary['repeated_steps']}, skipped steps {summary['skipped_steps']}, "
        f"redone after a rollback {len(summary['redone_steps'])}; run directory {run_dir}"
    )
    if summary.get("weights"):
        print(f"weights of step {summary['weights_step']}: {summary['weights']}")
    else:
        print(f"no weights: {summary.get('weights_note')}")
    if code == ExitCode.INTERRUPTED:
        print(f"stopped: the same command goes on from the newest complete checkpoint in {_ckpt_dir(cfg)}")
    return code


def _ckpt_dir(cfg) -> str:
    return str(cfg.checkpoint.dir or cfg.run_dir / "checkpoints")


def prepare_run_dir(cfg) -> str | None:
    """Carry out ``core.run_dir.plan_run_dir`` (the rule ``checkfree train`` follows too) for a swarm; returns
    why the swarm is refused, or None to go on, having said on stderr what it deleted or resumes from. The
    saved steps of a swarm are its complete checkpoints (every stage's file of a step); its peers resume
    from the newest themselves (``checkfree.swarm.restart``), this only decides whether they may."""
    from checkfree.core.run_dir import FRESH, REFUSE, RunDirState, inside, plan_run_dir
    from checkfree.swarm.restart import checkpoint_store

    run_dir, root = cfg.run_dir, _ckpt_dir(cfg)
    holds = run_dir.exists() and any(run_dir.iterdir())
    outside = not inside(root, str(run_dir))
    store = checkpoint_store(cfg, run_dir) if holds or outside else None
    steps = tuple(store.complete_steps()) if store is not None else ()
    state = RunDirState(str(run_dir), root, holds, outside, steps)
    plan = plan_run_dir(state, cfg.resume, cfg.overwrite, cfg.num_steps)
    if plan.action == REFUSE:
        return plan.message
    if plan.message:
        print(f"checkfree swarm: {plan.message}", file=sys.stderr)
    if plan.action == FRESH:
        try:
            if plan.clear_store:
                store.clear()
            if plan.delete_run_dir:
                import shutil

                shutil.rmtree(run_dir)
        except OSError as e:
            return f"overwrite=true cannot delete what it must: {e}"
    return None


def cmd_peer(ns: argparse.Namespace) -> int:
    import signal

    from checkfree.config import ConfigError, load_config, split_args
    from checkfree.core.data import DataError

    def on_term(signum, frame):  # before the peer exists there is nothing to hand over or save
        raise SystemExit(ExitCode.TERMINATED)

    signal.signal(signal.SIGTERM, on_term)
    if ns.parent_pid is not None:
        _exit_with_parent(ns.parent_pid)
    ns.args, ns.initial_peers = split_peer_args(ns.args, ns.initial_peers)
    files, overrides = split_args(ns.args)
    from checkfree.swarm.membership import DHTUnavailable

    try:
        cfg = load_config(files, overrides)
        from checkfree.swarm.peer import Peer

        peer = Peer(
            cfg,
            ns.run_dir or cfg.run_dir,
            None if ns.spare else ns.stage,
            ns.initial_peers,
            ns.peer_id,
            ns.join_token,
            inject_failures=ns.inject_failures,
            swarm_id=ns.swarm_id,
            device=ns.device,
        )
    except (ConfigError, DataError, ValueError) as e:
        print(f"checkfree peer: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except DHTUnavailable as e:  # e.g. no initial peer answered: nothing started, say so
        print(f"checkfree peer: {e}; are the --initial-peers live peers of the swarm?", file=sys.stderr)
        return ExitCode.BAD_INPUT

    def on_signal(signum, frame):
        # Ctrl-C: stop at the next step boundary and save; SIGTERM: leave the swarm (hand the stage to a spare,
        # else save), exit 143, never 0 (a managed-job system reads 0 as finished); a second Ctrl-C aborts
        if signum == signal.SIGINT and peer.stopping:
            raise KeyboardInterrupt
        peer.request_stop("interrupt" if signum == signal.SIGINT else "terminate")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        code = peer.run()
    except KeyboardInterrupt:
        code = ExitCode.INTERRUPTED
        print("checkfree peer: interrupted twice: aborted without saving", file=sys.stderr)
    for s in (signal.SIGINT, signal.SIGTERM):  # the peer is done: a late signal must not replace its exit code
        signal.signal(s, signal.SIG_IGN)
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    """End a peer that is done with ``code``, skipping the interpreter's shutdown: ``Peer.run`` closed what the
    peer owns, but daemon threads (a relay's pump, hivemind's future backend) may still run, and one writing
    to stderr while the interpreter finalizes aborts the process: a peer that had handed its stage over
    exited by SIGABRT instead of 143 in a CI run."""
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(int(code))


def split_peer_args(args: list[str], initial_peers: list[str]) -> tuple[list[str], list[str]]:
    """(config files and overrides, addresses): ``--initial-peers`` takes every word after it, so a
    ``key=value`` or a config file written after the addresses lands among them; a multiaddress starts
    with ``/`` and is not a YAML file, so those words are moved back to the config's (in their order, after
    the words before ``--initial-peers``: later overrides win, as on the command line)."""
    moved = [a for a in initial_peers if not a.startswith("/") or a.endswith((".yaml", ".yml"))]
    return [*args, *moved], [a for a in initial_peers if a not in moved]


def _exit_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent (a local launcher) dies, even by SIGKILL, so
    that a killed ``checkfree swarm`` never leaves its peers running (Linux prctl PR_SET_PDEATHSIG). SIGKILL
    because a peer the injector froze (SIGSTOP) would never act on a catchable signal; the peer's DHT
    process notices its parent is gone and exits on its own."""
    import ctypes
    import os
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        print(
            "checkfree peer: --parent-pid is not supported on this system (no prctl); continuing without it",
            file=sys.stderr,
        )
    if os.getppid() != parent:  # the launcher died before (or while) this process asked to follow it
        raise SystemExit(0)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    swarm = sub.add_parser(
        "swarm",
        parents=[common],
        help="run a whole swarm of peer processes on this machine",
        description=SWARM_HELP,
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    swarm.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value")
    swarm.set_defaults(func=cmd_swarm)
    peer = sub.add_parser(
        "peer",
        parents=[common],
        help="start one peer (anywhere) that joins a swarm",
        description=PEER_HELP,
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    peer.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value")
    peer.add_argument(
        "--initial-peers",
        nargs="+",
        default=[],
        metavar="MULTIADDR",
        help="multiaddresses of any live peers of the swarm, e.g. /ip4/10.0.0.5/tcp/40123/p2p/12D3KooW... "
        "(checkfree status lists every peer's); none: this peer starts a new swarm and logs its own. Words after it "
        "that are not multiaddresses (key=value, a .yaml file) are the config's",
    )
    role = peer.add_mutually_exclusive_group(required=True)
    role.add_argument("--stage", type=int, help="ask for this stage (0-based)")
    role.add_argument("--spare", action="store_true", help="wait to replace a lost stage")
    peer.add_argument(
        "--run-dir", help="where this peer writes its events, metrics and checkpoints (default OUT_DIR/RUN_NAME)"
    )
    peer.add_argument(
        "--peer-id", help="a name for this peer (its id is NAME.HASH, the hash of its key; default: random)"
    )
    peer.add_argument(
        "--join-token",
        help="the swarm's secret (default: $CHECKFREE_JOIN_TOKEN, else RUN_DIR/join_token; prefer the variable: "
        "a command line is visible to other users); without it and without --initial-peers a new one is made",
    )
    peer.add_argument(
        "--swarm-id",
        help="the id of the swarm to join (default: $CHECKFREE_SWARM_ID, else RUN_DIR/swarm_id); a peer without "
        "--initial-peers starts a new swarm and draws a new id",
    )
    peer.add_argument(
        "--device",
        help="this peer's device: cpu, cuda (the first visible GPU) or cuda:K (default: the config's device; "
        "checkfree swarm gives each peer its own, see swarm.devices)",
    )
    peer.add_argument(
        "--inject-failures",
        action="store_true",
        help="draw the config's failures and die at this peer's own (set by checkfree swarm with "
        "swarm.inject=peer, for failure experiments); without it a peer never fails on purpose",
    )
    peer.add_argument(
        "--parent-pid",
        type=int,
        metavar="PID",
        help="the process that started this peer (set by checkfree swarm): exit when it dies",
    )
    peer.set_defaults(func=cmd_peer)
