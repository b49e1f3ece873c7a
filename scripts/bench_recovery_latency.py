"""Recovery latency in the real swarm: detect, rebuild and resume seconds over many kills.

Each experiment is one local swarm run (``checkfree swarm``) with a fixed failure trace that kills the
first, a middle and the last stage in turn (SIGKILL: a crash; or SIGSTOP: a hang), two spares standing
by. The launcher pairs every kill with its recovery (``launcher/report.py``):

- detect_s: kill -> first peer noticing (a transport error; for a hang, the heartbeat's expiry);
- decide_s: detection -> the leader publishes the new epoch (a crash is confirmed by the lost peer's
  refused probe, a hang by its expired heartbeat);
- rendezvous_s: publish -> the new group formed and the transfer starting;
- transfer_s: the transfer of weights and the rebuild;
- resume_s: rebuild -> first step committed in the new epoch;
- kill_to_commit_s: all of it, kill -> first committed step after the recovery
  (and rebuild_s, detection -> rebuilt, as before).

Experiments vary one thing at a time from the base (the tiny default: 4 stages, d_model 128, heartbeat
DHT heartbeat period 2 s / TTL 8 s, watch 0.5 s): crash vs hang, model width (stage bytes), number of stages
(2, 4, 8), the watch interval (how often members read each other's records through their probe ports) and
the DHT heartbeat period / TTL (which detection no longer depends on); and on emulated hosts (``netns-*``,
root only): crashes, hosts that vanish without a TCP reset, and 100 Mbit/s links with growing stages (what
the transfer costs). Prints and saves the distribution per experiment and a box plot.

    python scripts/bench_recovery_latency.py [CONFIG.yaml ...] [key=value ...] [--only NAME ...] [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from checkfree.config import load_config, split_args
from checkfree.core.failures import Failure, write_trace
from checkfree.core.metrics import report
from checkfree.core.model import Stage
from checkfree.core.redundancy import param_bytes
from checkfree.plot import save_figure
from launcher.local import run_local_swarm

FIRST_MIDDLE_LAST = "first-middle-last"
# name -> (overrides, which stages to kill); every experiment changes one thing from "crash"
EXPERIMENTS = {
    "crash": ([], "all"),
    "hang": (["swarm.hang_fraction=1.0"], FIRST_MIDDLE_LAST),
    "d64": (["model.d_model=64"], FIRST_MIDDLE_LAST),
    "d256": (["model.d_model=256"], FIRST_MIDDLE_LAST),
    "stages2": (["model.num_stages=2", "recovery.strategy=checkfree"], FIRST_MIDDLE_LAST),
    "stages8": (["model.num_stages=8"], FIRST_MIDDLE_LAST),
    "hang-watch0.25": (["swarm.hang_fraction=1.0", "membership.watch_s=0.25"], FIRST_MIDDLE_LAST),
    "hb0.5-ttl2": (["membership.period_s=0.5", "membership.ttl_s=2.0"], FIRST_MIDDLE_LAST),
    # every peer on an emulated host of its own (needs root): real sockets between addresses, no loopback
    "netns-crash": (["swarm.hosts=netns"], FIRST_MIDDLE_LAST),
    # the victim's host vanishes (its link goes down: no TCP reset), so only the silent probe tells
    "netns-vanish": (
        ["swarm.hosts=netns", "swarm.vanish_fraction=1.0", "membership.rpc_timeout_s=0.5"],
        FIRST_MIDDLE_LAST,
    ),
    # 100 Mbit/s links: what moving a stage costs as stages grow
    "netns-100mbit": (["swarm.hosts=netns", "swarm.host_rate_mbit=100"], FIRST_MIDDLE_LAST),
    "netns-100mbit-d256": (["swarm.hosts=netns", "swarm.host_rate_mbit=100", "model.d_model=256"], FIRST_MIDDLE_LAST),
    "netns-100mbit-d512": (["swarm.hosts=netns", "swarm.host_rate_mbit=100", "model.d_model=512"], FIRST_MIDDLE_LAST),
}


def _kills(which: str, num_stages: int, every: int, repeat: int = 1) -> list[Failure]:
    stages = list(range(num_stages)) if which == "all" else sorted({0, num_stages // 2, num_stages - 1})
    return [Failure(every * (n + 1), s, "mid_forward", 0.5) for n, s in enumerate(stages * repeat)]


def _dist(values: list[float | None]) -> dict | None:
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "n": len(v)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="config files and key=value overrides (applied to every experiment)")
    ap.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), help="run these experiments only")
    ap.add_argument(
        "--every",
        type=int,
        default=10,
        help="steps between kills (the launcher also waits swarm.min_gap_s=1 s after each resume; a replacement "
        "spare starts swarm.spare_delay_s=3 s after each kill, and 10 steps keep its start-up out of the next "
        "recovery)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="kill each experiment's stages this many times in turn")
    ap.add_argument("--out", default="runs/bench/recovery_latency.json")
    ns = ap.parse_args()
    files, overrides = split_args(ns.args)
    tmp = Path(tempfile.mkdtemp(prefix="cf-latency-"))
    results = {}
    for name in ns.only or list(EXPERIMENTS):
        extra, which = EXPERIMENTS[name]
        base = load_config(files, [*overrides, *extra])
        kills = _kills(which, base.model.num_stages, ns.every, ns.repeat)
        trace = tmp / f"{name}-trace.jsonl"
        write_trace(trace, kills, base.model.num_stages)
        args = [
            f"run_name={name}",
            f"out_dir={tmp}",
            "progress=false",
            "plot=false",
            "eval_every_steps=0",
            "swarm.num_spares=2",
            "swarm.spare_delay_s=3",  # the default: a replacement starts after the recovery, as a new host would
            "swarm.min_gap_s=1",
            f"num_steps={ns.every * (len(kills) + 1)}",
            "failures.mode=trace",
            f"failures.trace_path={trace}",
            *overrides,  # the user's settings win over this benchmark's defaults above
            *extra,
        ]
        cfg = load_config(files, args)
        code, summary = run_local_swarm(cfg, tmp / name, status=False)
        # the kills this benchmark injected (a loss it did not cause, e.g. a rebuild broken off, is its own row)
        rows = [r for r in summary["recovery_rows"] if r.get("injected", True)]
        stage = Stage(cfg.model, min(1, cfg.model.num_stages - 1))
        results[name] = {
            "exit_code": code,
            "scheduled_kills": len(kills),
            "kills": len(rows),
            "recovered": sum(r["resume_s"] is not None for r in rows),
            "overrides": extra,
            "num_stages": cfg.model.num_stages,
            "d_model": cfg.model.d_model,
            "stage_param_bytes": param_bytes(stage),
            "period_s": cfg.membership.period_s,
            "ttl_s": cfg.membership.ttl_s,
            "watch_s": cfg.membership.watch_s,
            "transport_timeout_s": cfg.transport.timeout_s,
            "detect_s": _dist([r["detect_s"] for r in rows]),
            "rebuild_s": _dist([r["rebuild_s"] for r in rows]),
            "resume_s": _dist([r["resume_s"] for r in rows]),
            "decide_s": _dist([r["decide_s"] for r in rows]),
            "rendezvous_s": _dist([r["rendezvous_s"] for r in rows]),
            "transfer_s": _dist([r["transfer_s"] for r in rows]),
            "kill_to_commit_s": _dist([r["kill_to_commit_s"] for r in rows]),
            "stage_losses": summary.get("stage_losses"),
            "transfer_and_rebuild_s": _dist([r["transfer_and_rebuild_s"] for r in rows]),
            "rows": [
                {
                    k: r[k]
                    for k in (
                        "stage",
                        "signal",
                        "method",
                        "detect_s",
                        "rebuild_s",
                        "resume_s",
                        "transfer_and_rebuild_s",
                        "detected_by",
                        "decide_s",
                        "rendezvous_s",
                        "transfer_s",
                        "kill_to_commit_s",
                    )
                }
                for r in rows
            ],
        }
        fmt = lambda d: "-" if d is None else f"{d['median']:.2f} [{d['min']:.2f}, {d['max']:.2f}]"
        print(
            f"{name:12s} exit {code} recovered {results[name]['recovered']}/{len(rows)} kills "
            f"({len(kills)} scheduled)  detect {fmt(results[name]['detect_s'])}"
            f"  decide {fmt(results[name]['decide_s'])}  rendezvous {fmt(results[name]['rendezvous_s'])}"
            f"  transfer {fmt(results[name]['transfer_s'])}  resume {fmt(results[name]['resume_s'])}"
            f"  kill->commit {fmt(results[name]['kill_to_commit_s'])}",
            flush=True,
        )
    _plot(results, Path(ns.out).with_suffix(".png"))
    report({"experiments": results, "every": ns.every, "repeat": ns.repeat, "run_dirs": str(tmp)}, ns.out)


def _plot(results: dict, path: Path) -> None:
    keys = ("detect_s", "decide_s", "rendezvous_s", "transfer_s", "resume_s", "kill_to_commit_s")
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.5), sharey=False)
    names = list(results)
    for ax, key in zip(axes, keys):
        data = [[r[key] for r in results[n]["rows"] if r[key] is not None] or [float("nan")] for n in names]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right")
        ax.set_title(key.replace("_s", " (s)"))
        ax.grid(alpha=0.3)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
