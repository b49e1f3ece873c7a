"""
Metrics
=======

``metrics.jsonl`` in the run directory: one record per committed step, keys namespaced like
``loss/train``, ``throughput/tokens_per_s``, ``stage/2/grad_norm_raw`` (the event stream is
``checkfree.core.events``). Every line is flushed as it is written, so a crashed run keeps everything up
to its last step. With ``metrics.tensorboard=true`` every numeric field also goes to TensorBoard, written
with torch's standard ``SummaryWriter`` (the optional ``tensorboard`` extra), at the record's step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MetricsConfig:
    tensorboard: bool = False  # also write every numeric metric as a TensorBoard scalar (needs the tensorboard extra)
    tensorboard_dir: str | None = None  # where; None: RUN_DIR/tensorboard (a swarm peer: RUN_DIR/tensorboard/PEER)


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


class MetricLogger(JsonLines):
    """``metrics.jsonl``, and TensorBoard scalars when ``tensorboard_dir`` is given."""

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None):
        super().__init__(path)
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError(
                    "metrics.tensorboard=true needs the tensorboard package: pip install 'checkfree[tensorboard]'"
                ) from e
            self.tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def write(self, record: dict) -> None:
        super().write(record)
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, global_step=record["step"])

    def close(self) -> None:
        super().close()
        if self.tb is not None:
            self.tb.flush()


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
