"""
Metrics
=======

``metrics.jsonl`` in the run directory: one record per committed step, keys namespaced like
``loss/train``, ``throughput/tokens_per_s``, ``stage/2/grad_norm_raw`` (the event stream is
``checkfree.core.events``). Every line is flushed as it is written, so a crashed run keeps everything up
to its last step.

The one metrics schema of both executors (``RECORDS``, ``KEYS``): a *step* record of a run directory's
metrics.jsonl carries ``step``, ``iteration``, ``loss/train``, ``throughput/tokens_per_s``, ``time/step_s``
and ``time/train_s``, whichever executor wrote it (the engine's ``step_record``; the swarm's peers' rows as
the launcher merges them), so analysis reads both alike (``checkfree.analysis.runs``). A swarm peer's own
file holds *peer_step* rows (no ``time/train_s``: a peer does not know when the swarm's first step started,
the merge of every peer's rows does; ``epoch``, ``stage`` and ``time/wall`` instead) and *peer_eval* rows (a
validation loss, merged into the step's record). Every key is typed in ``KEYS``; ``check_record`` raises on
a missing, unknown or mistyped key. It is checked where it costs the training nothing: the tests check
every row of a real engine run and a real local swarm run, and a reader may check a run (``check_rows``);
``MetricLogger.write`` does not check (a wrong metrics key must not stop a run).

Trackers: with ``metrics.tensorboard=true`` every numeric field also goes to TensorBoard, written with
torch's standard ``SummaryWriter`` (the optional ``tensorboard`` extra), at the record's step; with
``metrics.wandb=true`` to a Weights & Biases run (the ``wandb`` package), against the same step (W&B's
``step`` metric, so that steps redone after a rollback are drawn where they belong). An ``EventLog`` given
the logger as its tracker also turns each event into counters at the event's step (``event_scalars``):
``events/failures``, ``events/recoveries``, ``recovery/duration_s`` and so on, which a dashboard draws
beside the loss.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class MetricsConfig:
    tensorboard: bool = False  # also write every numeric metric as a TensorBoard scalar (needs the tensorboard extra)
    tensorboard_dir: str | None = None  # where; None: RUN_DIR/tensorboard (a swarm peer: RUN_DIR/tensorboard/PEER)
    wandb: bool = False  # also log every numeric metric and the event counters to Weights & Biases (needs wandb)
    wandb_project: str = "checkfree"  # the W&B project
    wandb_entity: str | None = None  # the W&B team or user; None: the default of the logged-in account
    wandb_name: str | None = None  # the W&B run's name; None: run_name (a swarm peer: RUN_NAME/PEER, grouped by run)
    # online; offline (files under RUN_DIR/wandb, uploaded later by `wandb sync`); disabled; None: $WANDB_MODE or online
    wandb_mode: str | None = None

    def __post_init__(self) -> None:
        if self.wandb_mode is not None and self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"metrics.wandb_mode={self.wandb_mode!r}: expected one of {', '.join(WANDB_MODES)}")


@dataclass(frozen=True)
class MetricKey:
    name: str  # the key; ``<i>`` in a per-stage key stands for a stage index
    type: str  # "int" or "number" (a JSON number; a non-finite float is written as "nan", "inf" or "-inf")
    written_by: str  # engine, swarm, or both
    meaning: str


KEYS: dict[str, MetricKey] = {
    k.name: k
    for k in (
        MetricKey("step", "int", "both", "the committed step (0-based); its record is written after it committed"),
        MetricKey(
            "iteration",
            "int",
            "both",
            "the step attempt that committed it (0-based), interrupted and discarded attempts counted; the swarm's "
            "count is carried across epochs by the epoch record, as failure injection draws by it",
        ),
        MetricKey("loss/train", "number", "both", "training loss of the step (mean over its microbatches)"),
        MetricKey("loss/val", "number", "both", "validation loss on the fixed batches after the step, when evaluated"),
        MetricKey("throughput/tokens_per_s", "number", "both", "tokens per second (engine: saves included)"),
        MetricKey("time/step_s", "number", "both", "seconds the step itself took"),
        MetricKey(
            "time/train_s",
            "number",
            "both",
            "the run's clock when the step committed: engine, seconds spent training, recovering and "
            "checkpointing (evaluation excluded); swarm, wall-clock seconds since the launch (the launcher's merge)",
        ),
        MetricKey("time/wall", "number", "swarm", "unix time when the step committed (the clock the peers share)"),
        MetricKey("epoch", "int", "swarm", "the membership epoch that committed the step (never a pass over data)"),
        MetricKey("stage", "int", "swarm", "the stage of the peer that wrote the row"),
        MetricKey("memory/max_rss_mb", "number", "swarm", "the peer's peak resident memory (MB)"),
        MetricKey("memory/shadow_bytes", "number", "swarm", "bytes of the shadow copy the peer holds (redundant)"),
        MetricKey("comm/bytes_sent", "number", "swarm", "bytes of activations and gradients the stage sent"),
        MetricKey("stage/<i>/lr", "number", "engine", "stage i's learning rate after the step"),
        MetricKey("stage/<i>/grad_norm_raw", "number", "both", "stage i's pre-clip gradient norm"),
        MetricKey("stage/<i>/grad_norm_smoothed", "number", "engine", "stage i's smoothed gradient norm"),
    )
}


@dataclass(frozen=True)
class RecordType:
    name: str
    required: tuple[str, ...]
    meaning: str


_STEP = ("step", "iteration", "loss/train", "throughput/tokens_per_s", "time/step_s")
RECORDS: dict[str, RecordType] = {
    r.name: r
    for r in (
        RecordType("step", (*_STEP, "time/train_s"), "a committed step in a run directory's metrics.jsonl"),
        RecordType("peer_step", (*_STEP, "time/wall", "epoch", "stage"), "a swarm peer's row of a committed step"),
        RecordType("peer_eval", ("step", "epoch", "stage", "loss/val"), "a swarm peer's validation row"),
    )
}
_NON_FINITE = ("nan", "inf", "-inf")  # how JsonLines writes a non-finite float


def _key_type(key: str) -> MetricKey | None:
    return KEYS.get(re.sub(r"^stage/\d+/", "stage/<i>/", key))


def _has_type(value, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int) and value >= 0
    return isinstance(value, (int, float)) or value in _NON_FINITE


def check_record(record: dict, kind: str = "step") -> None:
    """Check one metrics row against the schema: ``kind``'s required keys are there, every key is in
    ``KEYS`` and has its type (a row as written, or as read back from JSON).

    Raises:
        ValueError: naming the key, its value and what was expected.
    """
    rtype = RECORDS.get(kind)
    if rtype is None:
        raise ValueError(f"unknown metrics record kind {kind!r}; known kinds: {', '.join(RECORDS)}")
    missing = [k for k in rtype.required if k not in record]
    if missing:
        raise ValueError(f"metrics {kind} record of step {record.get('step')!r} is missing required keys {missing}")
    for key, value in record.items():
        mk = _key_type(key)
        if mk is None:
            raise ValueError(
                f"metrics key {key!r} (value {value!r}) is not in the schema (checkfree.core.metrics.KEYS)"
            )
        if not _has_type(value, mk.type):
            expected = "a non-negative int" if mk.type == "int" else "a number (or 'nan', 'inf', '-inf')"
            raise ValueError(f"metrics key {key!r} = {value!r}: expected {expected}")


def check_rows(rows: Iterable[dict], kind: str = "step") -> None:
    """``check_record`` of every row; a swarm peer's file (kind ``peer``): each row as ``peer_eval`` when it
    carries ``loss/val`` but no ``loss/train``, else as ``peer_step``."""
    for row in rows:
        if kind == "peer":
            check_record(row, "peer_eval" if "loss/val" in row and "loss/train" not in row else "peer_step")
        else:
            check_record(row, kind)


def schema_table() -> str:
    """The record kinds and the keys as markdown tables (for the docs; a test keeps docs/ARCHITECTURE.md equal)."""
    lines = ["| record | required keys | what it is |", "|---|---|---|"]
    lines += [f"| {r.name} | {', '.join(f'`{k}`' for k in r.required)} | {r.meaning} |" for r in RECORDS.values()]
    lines += ["", "| key | type | written by | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k.name}` | {k.type} | {k.written_by} | {k.meaning} |" for k in KEYS.values()]
    return "\n".join(lines)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB. On Linux from ``VmHWM`` in /proc/self/status: unlike
    ``getrusage``'s ``ru_maxrss``, which a process started by fork + exec inherits from its parent (a
    launcher's 700 MB would show as every peer's peak), it covers this program's own memory only."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class JsonLines:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open(self.path, "a", buffering=1)

    def write(self, record: dict) -> None:
        if self._f.closed:  # e.g. a recovery run by a script after the training loop ended
            self._f = open(self.path, "a", buffering=1)
        self._f.write(json.dumps(_clean(record)) + "\n")

    def close(self) -> None:
        self._f.close()


def event_scalars(event: dict, counts: Counter) -> dict[str, float]:
    """The tracker scalars of one event (see ``checkfree.core.events``), updating ``counts``, the running
    totals by counter name: ``events/failures`` (stages lost), ``events/recoveries`` (stages rebuilt or
    restored), ``events/rollbacks``, ``events/steps_discarded``, ``events/steps_aborted`` and
    ``events/stage_losses`` (a swarm leader's published losses) as cumulative counts; the durations of
    what the event timed (``recovery/duration_s``, ``recovery/restore_s``, ``recovery/join_s``,
    ``checkpoint/save_s``). An event that counts nothing gives ``{}``."""
    name = event["event"]
    out: dict[str, float] = {}

    def bump(counter: str, by: int = 1) -> None:
        counts[counter] += by
        out[f"events/{counter}"] = counts[counter]

    if name == "failure":
        bump("failures")
    elif name == "rebuilt":
        bump("recoveries")
        out["recovery/duration_s"] = event["duration_s"]
    elif name == "rolled_back":
        bump("rollbacks")
        if event.get("stages"):  # the engine names the stages lost; each swarm peer logs its own rollback
            bump("recoveries", len(event["stages"]))
        out["recovery/restore_s"] = event["restore_s"]
        if "lost_steps" in event:
            out["recovery/lost_steps"] = event["lost_steps"]
    elif name == "step_discarded":
        bump("steps_discarded")
    elif name == "step_skipped":
        bump("steps_skipped")
    elif name == "step_aborted":
        bump("steps_aborted")
    elif name == "epoch_published" and event["lost"]:
        bump("stage_losses", len(event["lost"]))
    elif name == "epoch_joined":
        out["recovery/join_s"] = event["join_s"]
    elif name == "checkpoint_save":
        out["checkpoint/save_s"] = event["save_s"]
    elif name == "checkpoint_failed":
        bump("checkpoint_failures")
    return out


def check_trackers(cfg: MetricsConfig) -> None:
    """Raise ``ValueError`` now, before a run touches its directory, when a tracker ``cfg`` asks for is not
    installed (``MetricLogger`` would raise it only once the run directory is made)."""
    import importlib.util

    needs = [("tensorboard", "tensorboard", "checkfree[tensorboard]")] if cfg.tensorboard else []
    needs += [("wandb", "wandb", "wandb")] if cfg.wandb else []
    for key, module, package in needs:
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"metrics.{key}=true needs the {module} package: pip install '{package}'")


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricLogger(JsonLines):
    """``metrics.jsonl`` (none when ``path`` is None: trackers only), and the trackers: TensorBoard
    scalars when ``tensorboard_dir`` is given, a W&B run when ``wandb`` (keyword arguments of
    ``wandb.init``) is. ``track_event`` makes it an ``EventLog``'s tracker.

    Raises:
        ValueError: a tracker's package is missing, or W&B could not start a run (no account online).
    """

    def __init__(self, path: str | Path | None, tensorboard_dir: str | Path | None = None, wandb: dict | None = None):
        if path is not None:
            super().__init__(path)
        else:
            self.path, self._f = None, None
        self.tb = None
        self.wandb = None
        self.counts: Counter = Counter()  # running totals of the event counters (event_scalars)
        self.last_step = 0  # where an event without a step of its own is drawn
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError(
                    "metrics.tensorboard=true needs the tensorboard package: pip install 'checkfree[tensorboard]'"
                ) from e
            self.tb = SummaryWriter(log_dir=str(tensorboard_dir))
        if wandb is not None:
            self.wandb = _start_wandb(wandb)

    @classmethod
    def from_config(
        cls,
        path: str | Path | None,
        cfg: MetricsConfig,
        run_dir: str | Path,
        run_name: str,
        peer: str | None = None,
        run_config=None,
    ) -> MetricLogger:
        """The logger a run's ``metrics`` section asks for. ``peer``: a swarm peer's (or the launcher's)
        id: its TensorBoard folder and W&B run are its own, in the run's group; ``run_config``: the
        resolved config (a dataclass or a dict), shown by W&B."""
        run_dir = Path(run_dir)
        tb_dir = None
        if cfg.tensorboard:
            tb_dir = Path(cfg.tensorboard_dir or run_dir / "tensorboard")
            tb_dir = tb_dir / peer if peer else tb_dir
        wandb = None
        if cfg.wandb:
            name = cfg.wandb_name or run_name
            wandb = {
                "project": cfg.wandb_project,
                "entity": cfg.wandb_entity,
                "name": f"{name}/{peer}" if peer else name,
                "group": name if peer else None,
                "mode": cfg.wandb_mode,
                "dir": str(run_dir),
                "config": _plain(run_config),
            }
            run_dir.mkdir(parents=True, exist_ok=True)
        return cls(path, tb_dir, wandb)

    def write(self, record: dict) -> None:
        if self.path is not None:
            super().write(record)
        if "step" in record:
            self.last_step = record["step"]
            self._track({k: v for k, v in record.items() if k != "step" and _numeric(v)}, record["step"])

    def track_event(self, event: dict) -> None:
        """Send ``event``'s counters (``event_scalars``) to the trackers, at its step (else the last
        metrics step)."""
        scalars = event_scalars(event, self.counts)
        if scalars:
            step = event["step"] if _numeric(event.get("step")) else self.last_step
            self._track(scalars, step)

    def _track(self, scalars: dict, step: int) -> None:
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, global_step=step)
        if self.wandb is not None and scalars:
            self.wandb.log({**scalars, "step": step})

    def close(self) -> None:
        """Close the file, flush TensorBoard and finish the W&B run (the file reopens on a later write;
        the W&B run does not: later values go to the file and TensorBoard only)."""
        if self.path is not None:
            super().close()
        if self.tb is not None:
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _plain(config) -> dict | None:
    """A config as W&B stores it: nested dicts of JSON values (paths and the like as strings)."""
    if config is None:
        return None
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(_clean(config), default=str))


def _start_wandb(init: dict):
    try:
        import wandb
    except ImportError as e:
        raise ValueError("metrics.wandb=true needs the wandb package: pip install wandb") from e
    try:
        run = wandb.init(**init, settings=wandb.Settings(silent=True, console="off"))
    except Exception as e:  # wandb's errors (no API key, no network) share no base class with ours
        raise ValueError(
            f"metrics.wandb=true could not start a W&B run of project {init['project']!r}: {e}; log in with "
            "`wandb login`, or log offline with metrics.wandb_mode=offline (upload later with `wandb sync`)"
        ) from e
    # every value is drawn against the training step, which goes back after a rollback (W&B's own step may not)
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def report(result: dict, out: str | Path) -> None:
    """Print a benchmark's result and save it as JSON (for scripts/)."""
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
