"""
Chaos soak
==========

One local swarm through ``--events`` chaos events (``swarm.chaos``: kills, bursts, waves, hangs, spares
killed or arriving, and kills timed to land inside a recovery: the leader right after it publishes, a source
during the transfer, the spare during its join, the rebuilt stage before its first step; and the benign
kinds, which fail nothing: probe floods, and starvation by SIGSTOP pulses shorter than ``membership.hang_s``
and busy loops), then the same run failure-free for the reference loss.

1. Calibrate: a short failure-free swarm gives the step time (median gap between commits, warm-up left out).
2. Length: ``num_steps`` = events x budget x ``--safety`` / step time, so that training alone outlasts the
   events (every recovery only adds wall-clock on top); printed. An event's budget is its mean gap plus, for
   the share of triggered kinds, ``--trigger-timeout-s``: a triggered kind waits for its moment in a
   recovery (one drawn while the swarm is healthy starts that recovery with a kill of its own), and is
   dropped if the moment does not come in that time; with these settings a recovery reaches its publish and
   rebuild within a few seconds.
3. The chaos swarm, then a failure-free swarm of the same ``num_steps`` and seed (chaos off).

Checks (PASS/FAIL, each with its number): the launcher exited 0; at least ``--events`` events injected
(``chaos`` events in ``launcher-events.jsonl``: a triggered kind that never fires is dropped, not counted);
every step committed exactly once on the final timeline (``steps == num_steps``, none repeated, none skipped;
steps that a rollback of the ``checkpoint`` or ``hybrid`` strategy abandoned, and steps applied only by peers that
were all lost before the swarm resumed at or before them, are redone, by design, and counted apart:
launcher/report.py ``timeline``); every stage's
lineage valid (each peer that trained a stage either held it from epoch 0 or was rebuilt for it, or rolled
back, in an epoch no later than the first it trained in); no process left in any spawned peer's process
group; no healthy eviction: no peer that chaos only flooded or starved (never killed nor hung) was declared
lost, and no peer chaos never failed learnt that its stage was given to another (``launcher.chaos.
healthy_evictions``, each listed with the benign events that hit it); the final validation loss of both runs
reported (difference and ratio; no bound).
Reports the events of each kind (the benign ones counted apart), stage losses, completed recoveries and the
median / max / n of each recovery phase, split into crash (SIGKILL) and hang (SIGSTOP). Saves ``soak.json``
and ``soak.md`` under ``--out`` beside the three run directories; exits 1 if a check fails.

Swarm settings for a 2-core machine (``launcher.presets.SWARM_2CORE``, which the real-swarm tests run with): one
torch thread a peer (stage peers and spares share the cores), heartbeats every 0.25 s expiring after 1.5 s
(a hang is seen in ~1.5 s), a 5 s transport backstop, a fresh spare 1 s after each loss. Model: the built-in
default (no config file), or the toy model of ``launcher.presets`` with ``--tiny``; ``--smoke``: that model,
30 events 0.5 s apart (minutes).

    python scripts/soak.py [CONFIG.yaml ...] [key=value ...] [--events 200] [--seed 0] [--mean-gap-s 1.5]
        [--spares 3] [--trigger-timeout-s 4] [--safety 1.5] [--out runs/bench/soak] [--tiny] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from checkfree.config import load_config, split_args
from checkfree.core.exit_codes import ExitCode
from checkfree.core.metrics import read_jsonl
from checkfree.swarm.config import ChaosConfig
from launcher.attacks import healthy_evictions
from launcher.chaos import BENIGN, TRIGGERED
from launcher.local import run_local_swarm
from launcher.presets import SWARM_2CORE, TINY

SMOKE_EVENTS, SMOKE_MEAN_GAP_S = 30, 0.5
CALIBRATE_STEPS, CALIBRATE_SKIP = 30, 5  # the first steps are slow (allocation, every peer warming up)
MIN_STEPS = 20
PHASES = ("detect_s", "decide_s", "rendezvous_s", "transfer_s", "resume_s", "rebuild_s", "kill_to_commit_s")
LEFT_GRACE_S = 2.0  # the launcher SIGKILLs every peer group as it ends; a little time for the kernel to finish


class Soak:
    """The runs of one soak, each in a fresh directory under ``out``."""

    def __init__(self, files: list[str], overrides: list[str], out: Path):
        self.files, self.overrides, self.out = files, overrides, out
        self.left: dict[str, list[list[str]]] = {}  # run name -> ps rows still alive in its peers' groups

    def run(self, name: str, *extra: str) -> tuple[int, dict, Path]:
        run_dir = self.out / name
        if run_dir.exists():  # this script's own run directory from an earlier soak
            shutil.rmtree(run_dir)
        cfg = load_config(self.files, [*self.overrides, f"run_name={name}", f"out_dir={self.out}", *extra])
        t0 = time.monotonic()
        code, summary = run_local_swarm(cfg, run_dir, status=False)
        print(f"{name}: exit {code} after {time.monotonic() - t0:.0f} s, {summary['steps']} steps", flush=True)
        if code == ExitCode.INTERRUPTED:
            raise SystemExit(f"interrupted; run directory {run_dir}")
        self.left[name] = processes_left(spawned_pids(run_dir), LEFT_GRACE_S)
        return code, summary, run_dir


def spawned_pids(run_dir: Path) -> list[int]:
    """Every peer the launcher started: each in its own session, so its pid is its process group id."""
    return [e["pid"] for e in read_jsonl(run_dir / "launcher-events.jsonl") if e["event"] == "peer_spawned"]


def processes_left(pgids: list[int], grace_s: float) -> list[list[str]]:
    """``ps`` rows (pid, pgid, stat) of live, non-zombie processes in these process groups, after waiting up
    to ``grace_s`` for them to end. Whatever is left is then killed, so that the soak leaves nothing."""
    groups, deadline = set(pgids), time.monotonic() + grace_s
    while True:
        out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True, check=True).stdout
        rows = [line.split() for line in out.splitlines() if line.strip()]
        left = [r for r in rows if int(r[1]) in groups and not r[2].startswith("Z")]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for g in {int(r[1]) for r in left}:
        try:
            os.killpg(g, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def step_time_s(run_dir: Path, skip: int) -> float:
    """Median wall-clock between consecutive commits of a failure-free run, the first ``skip`` left out."""
    rows = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "loss/train" in m]
    walls = sorted(m["time/wall"] for m in rows)[skip:]
    if len(walls) < 2:
        raise SystemExit(f"calibration run {run_dir} committed {len(rows)} steps, too few to time")
    return statistics.median(b - a for a, b in zip(walls, walls[1:]))


def event_budget_s(chaos: ChaosConfig) -> float:
    """Seconds one chaos event may take at most: its mean gap, plus, for the share of kinds that are
    triggered, the wait for their moment in a recovery, at most ``trigger_timeout_s``."""
    share = sum(k in TRIGGERED for k in chaos.kinds) / len(chaos.kinds)
    return chaos.mean_gap_s + share * chaos.trigger_timeout_s


def plan_steps(events: int, event_s: float, safety: float, step_s: float) -> int:
    """Steps whose failure-free training alone lasts ``safety`` times the events' budget (recoveries, during
    which no step commits, only make the chaos run longer)."""
    return max(MIN_STEPS, math.ceil(events * event_s * safety / step_s))


def lineage(run_dir: Path) -> tuple[int, list[dict]]:
    """(the (peer, stage) pairs that trained, those whose weights were not theirs): a pair is valid when the
    peer joined epoch 0 holding the stage, or was rebuilt for it (``rebuilt``, or ``rolled_back`` under the
    checkpoint strategy) in an epoch no later than the first it trained the stage in."""
    events = read_jsonl(run_dir / "events.jsonl")
    initial = {(e["peer"], e["stage"]) for e in events if e["event"] == "epoch_joined" and e["joined_epoch"] == 0}
    rebuilt: dict[tuple[str, int], int] = {}
    for e in events:
        stage = e.get("stage") if e["event"] == "rebuilt" else e.get("stage_held")
        if e["event"] in ("rebuilt", "rolled_back") and stage is not None:
            key = (e["peer"], stage)
            rebuilt[key] = min(rebuilt.get(key, e["epoch"]), e["epoch"])
    first: dict[tuple[str, int], int] = {}
    for f in sorted((run_dir / "peers").glob("*/metrics.jsonl")):
        for m in read_jsonl(f):
            if "loss/train" in m:
                key = (f.parent.name, m["stage"])
                first[key] = min(first.get(key, m["epoch"]), m["epoch"])
    bad = [
        {"peer": p, "stage": s, "first_trained_epoch": e, "rebuilt_epoch": rebuilt.get((p, s))}
        for (p, s), e in sorted(first.items())
        if (p, s) not in initial and rebuilt.get((p, s), math.inf) > e
    ]
    return len(first), bad


def stop_reason(run_dir: Path) -> str | None:
    """Why the swarm stopped itself, as the first peer to stop said it (None: it did not)."""
    stops = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "swarm_stopped"]
    return f"{stops[0]['reason']} (first said by {stops[0]['peer']})" if stops else None


def _stats(values: list[float | None]) -> dict | None:
    v = [x for x in values if x is not None]
    return {"median": statistics.median(v), "max": max(v), "n": len(v)} if v else None


def phase_stats(rows: list[dict]) -> dict[str, dict]:
    """Median / max / n of each recovery phase over every row, and per signal where both kinds occur."""
    groups = {"all": rows}
    crash = [r for r in rows if r.get("signal") == "SIGKILL"]
    hang = [r for r in rows if r.get("signal") == "SIGSTOP"]
    if crash and hang:
        groups.update(crash=crash, hang=hang)
    return {g: {p: _stats([r[p] for r in rs]) for p in PHASES} for g, rs in groups.items()}


def _check(name: str, ok: bool, value: str) -> dict:
    return {"check": name, "ok": bool(ok), "value": value}


def checks(res: dict, left: dict[str, list]) -> list[dict]:
    """Each check of the soak with the number behind it."""
    s, n, want = res["chaos_summary"], res["num_steps"], res["events_requested"]
    repeated, skipped, redone = s["repeated_steps"], s["skipped_steps"], s.get("redone_steps", [])
    once = s["steps"] == n and not repeated and not skipped
    commits = f"steps {s['steps']}/{n}, repeated {repeated[:10]}, skipped {skipped[:10]}"
    if redone:
        commits += f"; {len(redone)} redone after rollbacks"
    if s.get("lost_steps"):
        commits += f"; redone as lost with every peer that applied them: {s['lost_steps'][:10]}"
    pairs, bad = res["lineage_pairs"], res["lineage_violations"]
    chaos_loss, ref_loss = res["final_val_loss"]["chaos"], res["final_val_loss"]["failure_free"]
    finite = all(isinstance(v, float) and math.isfinite(v) for v in (chaos_loss, ref_loss))
    losses = f"{chaos_loss} vs {ref_loss}"
    if finite:
        losses += f" ({res['loss_diff']:+.4f}, x{res['loss_ratio']:.4f})"
    n_left = sum(len(v) for v in left.values())
    evicted = res["healthy_evictions"]
    names = ", ".join(f"{r['peer']} ({r['how']}, epoch {r['epoch']})" for r in evicted[:5])
    return [
        _check("exit code 0", res["exit_code"] == 0, f"exit {res['exit_code']}"),
        _check("events injected >= requested", res["events_injected"] >= want, f"{res['events_injected']}/{want}"),
        _check("every step committed once", once, commits),
        _check("lineage valid", pairs and not bad, f"{len(bad)} of {pairs} (peer, stage) pairs invalid"),
        _check("no process left", n_left == 0, ", ".join(f"{k} {len(v)}" for k, v in left.items())),
        _check(
            "no healthy eviction (benign kinds)",
            not evicted,
            f"{len(evicted)} after {res['events_benign']} benign events" + (f": {names}" if names else ""),
        ),
        _check("final val loss vs failure-free", finite and res["reference_exit_code"] == 0, losses),
    ]


def _fmt(d: dict | None) -> str:
    return "-" if d is None else f"{d['median']:.2f} (max {d['max']:.2f}, n {d['n']})"


def render(res: dict) -> str:
    """The soak as markdown: command, checks, events per kind, recovery phases, losses."""
    s, loss = res["chaos_summary"], res["final_val_loss"]
    lines = [
        "# Chaos soak",
        "",
        f"`{res['command']}`",
        "",
        *([f"The chaos swarm stopped itself: {res['swarm_stopped']}.", ""] if res["swarm_stopped"] else []),
        f"{res['sizing']}; chaos run {res['chaos_wall_s']:.0f} s, failure-free {res['reference_wall_s']:.0f} s; "
        f"run directories `{res['out']}/{{calibrate,chaos,reference}}`.",
        "",
        "| check | result | value |",
        "|---|---|---|",
        *(f"| {c['check']} | {'PASS' if c['ok'] else 'FAIL'} | {c['value']} |" for c in res["checks"]),
        "",
        "| kind | events |",
        "|---|---|",
        *(f"| {k}{' (benign)' if k in BENIGN else ''} | {v} |" for k, v in res["events_by_kind"].items()),
        f"| **failures** | {res['events_injected'] - res['events_benign']} |",
        f"| **benign** | {res['events_benign']} |",
        f"| **total** | {res['events_injected']} |",
        "",
        f"Stage losses {s['stage_losses']}, failures {s['failures']} (launcher `failure` events "
        f"{s['injected_failures']}), completed recoveries {res['recoveries_completed']}.",
        "",
        "| phase | " + " | ".join(res["phases"]) + " |",
        "|---|" + "---|" * len(res["phases"]),
        *(f"| {p} | " + " | ".join(_fmt(g[p]) for g in res["phases"].values()) + " |" for p in PHASES),
        "",
        "Medians (max, n) in seconds over every recovery row; crash = SIGKILL, hang = SIGSTOP.",
        "",
        f"Final validation loss: chaos {loss['chaos']}, failure-free {loss['failure_free']}"
        + (f" (difference {res['loss_diff']:+.4f}, ratio {res['loss_ratio']:.4f})." if res["loss_ratio"] else "."),
        "",
    ]
    return "\n".join(lines)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="config files and key=value overrides (every run)")
    ap.add_argument("--events", type=int, help=f"chaos events to inject (default 200; --smoke {SMOKE_EVENTS})")
    ap.add_argument("--seed", type=int, default=0, help="the runs' seed and the chaos seed")
    ap.add_argument("--mean-gap-s", type=float, help=f"mean gap between events (1.5; --smoke {SMOKE_MEAN_GAP_S})")
    ap.add_argument("--spares", type=int, default=3, help="spares the swarm starts with")
    ap.add_argument(
        "--trigger-timeout-s", type=float, default=4.0, help="a triggered kind not fired by then is dropped"
    )
    ap.add_argument("--safety", type=float, default=1.5, help="failure-free training time over the events' budget")
    ap.add_argument("--out", default="runs/bench/soak")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny model (faster steps) instead of the default")
    ap.add_argument("--smoke", action="store_true", help="the tests' tiny model, 30 events: about 8 minutes")
    ns = ap.parse_args()
    ns.events = ns.events if ns.events is not None else SMOKE_EVENTS if ns.smoke else 200
    ns.mean_gap_s = ns.mean_gap_s if ns.mean_gap_s is not None else SMOKE_MEAN_GAP_S if ns.smoke else 1.5
    if ns.events < 1 or min(ns.mean_gap_s, ns.trigger_timeout_s, ns.safety) <= 0:
        ap.error(f"--events {ns.events} must be >= 1; --mean-gap-s, --trigger-timeout-s and --safety > 0")
    return ns


def soak(ns: argparse.Namespace) -> dict:
    files, user = split_args(ns.args)
    tiny = TINY if ns.smoke or ns.tiny else []
    base = [*SWARM_2CORE, *tiny, f"seed={ns.seed}", f"swarm.num_spares={ns.spares}"]
    runs = Soak(files, [*base, *user, "failures.mode=none"], Path(ns.out))
    chaos = [
        f"swarm.chaos.events={ns.events}",
        f"swarm.chaos.seed={ns.seed}",
        f"swarm.chaos.mean_gap_s={ns.mean_gap_s}",
        f"swarm.chaos.trigger_timeout_s={ns.trigger_timeout_s}",
    ]
    chaos_cfg = load_config(files, [*runs.overrides, *chaos])
    event_s = event_budget_s(chaos_cfg.swarm.chaos)
    code, _, cal_dir = runs.run("calibrate", f"num_steps={CALIBRATE_STEPS}", "swarm.chaos.events=0")
    if code != 0:
        raise SystemExit(f"the failure-free calibration run exited {code}; see {cal_dir}")
    step_s = step_time_s(cal_dir, CALIBRATE_SKIP)
    num_steps = plan_steps(ns.events, event_s, ns.safety, step_s)
    planned_s = num_steps * step_s
    sizing = (
        f"num_steps {num_steps} = {ns.events} events x {event_s:.2f} s (mean gap {ns.mean_gap_s} s + triggered "
        f"share x {ns.trigger_timeout_s} s) x {ns.safety} safety / {step_s:.3f} s a failure-free step "
        f"(~{planned_s:.0f} s of failure-free training)"
    )
    print(sizing, flush=True)
    timeout = f"swarm.run_timeout_s={max(1800, 4 * planned_s + 600):.0f}"  # recoveries stretch the chaos run
    code, summary, chaos_dir = runs.run("chaos", f"num_steps={num_steps}", timeout, *chaos)
    ref_code, ref, _ = runs.run("reference", f"num_steps={num_steps}", timeout, "swarm.chaos.events=0")
    plan = {"step_s": step_s, "event_budget_s": event_s, "num_steps": num_steps, "sizing": sizing}
    plan["hang_s"] = chaos_cfg.membership.hang_s  # what the healthy-eviction check allows a benign hit to last
    return collect(ns, runs, plan, (code, summary, chaos_dir), (ref_code, ref))


def collect(ns: argparse.Namespace, runs: Soak, plan: dict, chaos: tuple, reference: tuple) -> dict:
    (code, summary, run_dir), (ref_code, ref) = chaos, reference
    launcher = read_jsonl(run_dir / "launcher-events.jsonl")
    kinds = Counter(e["kind"] for e in launcher if e["event"] == "chaos")
    pairs, bad = lineage(run_dir)
    rows = summary["recovery_rows"]
    loss, ref_loss = summary["final_val_loss"], ref["final_val_loss"]
    both = loss is not None and ref_loss is not None
    res = {
        "command": shlex.join(["python", *sys.argv]),
        "out": str(runs.out),
        "events_requested": ns.events,
        "mean_gap_s": ns.mean_gap_s,
        "seed": ns.seed,
        "spares": ns.spares,
        "trigger_timeout_s": ns.trigger_timeout_s,
        "safety": ns.safety,
        "smoke": ns.smoke,
        **plan,
        "exit_code": int(code),
        "reference_exit_code": int(ref_code),
        "chaos_wall_s": summary.get("wall_s"),
        "reference_wall_s": ref.get("wall_s"),
        "events_injected": sum(kinds.values()),
        "events_benign": sum(n for k, n in kinds.items() if k in BENIGN),
        "events_by_kind": dict(sorted(kinds.items())),
        "healthy_evictions": healthy_evictions(read_jsonl(run_dir / "events.jsonl"), plan["hang_s"]),
        "lineage_pairs": pairs,
        "lineage_violations": bad,
        "processes_left": runs.left,
        "recoveries_completed": sum(1 for r in rows if r["completed"] and r["new_peer"]),
        "phases": phase_stats(rows),
        "final_val_loss": {"chaos": loss, "failure_free": ref_loss},
        "loss_diff": loss - ref_loss if both else None,
        "loss_ratio": loss / ref_loss if both and ref_loss else None,
        "swarm_stopped": stop_reason(run_dir),
        "peer_exit_codes": dict(Counter(str(c) for c in summary.get("exit_codes", {}).values())),
        "chaos_summary": {k: v for k, v in summary.items() if k != "recovery_rows"},
    }
    res["checks"] = checks(res, runs.left)
    return res


def main() -> int:
    ns = _args()

    def on_term(signum, frame):  # end like Ctrl-C: the launcher ends every peer and writes its report
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    res = soak(ns)
    out = Path(ns.out)
    (out / "soak.json").write_text(json.dumps(res, indent=2) + "\n")
    text = render(res)
    (out / "soak.md").write_text(text)
    print("\n" + text)
    print(f"saved {out / 'soak.json'} and {out / 'soak.md'}")
    return 0 if all(c["ok"] for c in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
