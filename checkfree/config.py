"""
Configuration
=============

``TrainConfig`` composes each module's section (model, data, pipeline, optim, failures, recovery,
checkpoint). Precedence: dataclass defaults < YAML files (in order) < ``key=value`` overrides. Code
receives dataclasses, never DictConfig. Any typo, wrong type, missing value or inconsistent combination
is a ``ConfigError`` raised before any work starts, naming the key, the value and what is allowed.

The defaults *are* the tiny CPU run (``configs/tiny.yaml`` spells them out): 4 stages of a small LLaMa
on the Python standard library's source, CheckFree+ recovery, failures injected at an accelerated rate.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from checkfree.core.checkpoint import CheckpointConfig
from checkfree.core.data import DataConfig
from checkfree.core.failures import FailureConfig
from checkfree.core.metrics import MetricsConfig
from checkfree.core.model import ModelConfig
from checkfree.core.recovery import SWAPPED, RecoveryConfig
from checkfree.core.schedule import PipelineConfig, swapped_count
from checkfree.core.stage_step import OptimConfig
from checkfree.swarm.config import MembershipConfig, SwarmConfig, TransportConfig


RESUME_MODES = ("auto", "never")


class ConfigError(ValueError):
    """A configuration that must not start a run."""


def _default_failures() -> FailureConfig:
    # 16%/hour per stage, each step standing for the paper's medium-model iteration (91.3 s) seen 2x
    # faster: ~0.9% per stage per step, i.e. a handful of failures in the tiny run's 200 steps.
    return FailureConfig(mode="hourly", hourly_rate=0.16, iteration_time_s=91.3, time_acceleration=2.0)


@dataclass
class TrainConfig:
    run_name: str = "tiny"  # run directory is OUT_DIR/RUN_NAME
    out_dir: str = "runs"
    overwrite: bool = False  # start afresh in an existing run directory: its files and RUN_DIR/checkpoints are deleted
    # what to do with a run directory that already holds this run: auto (resume from its newest complete
    # checkpoint, or refuse when it has none), never (refuse; overwrite=true starts afresh instead)
    resume: str = "auto"
    seed: int = 0  # model init and data order
    num_steps: int = 200  # optimizer steps to commit
    eval_every_steps: int = 25  # validation loss every k committed steps (and at the end); 0: only at the end
    device: str = "cpu"  # cpu, cuda or cuda:N
    num_threads: int = 0  # torch intra-op threads; 0: torch's default
    progress: bool = True  # progress bar on stderr
    plot: bool = True  # write loss.png into the run directory at the end
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    failures: FailureConfig = field(default_factory=_default_failures)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    membership: MembershipConfig = field(default_factory=MembershipConfig)  # swarm only
    transport: TransportConfig = field(default_factory=TransportConfig)  # swarm only
    swarm: SwarmConfig = field(default_factory=SwarmConfig)  # swarm only

    def __post_init__(self) -> None:
        L, strategy = self.model.num_stages, self.recovery.strategy
        if self.resume not in RESUME_MODES:
            raise ValueError(f"resume={self.resume!r} must be one of {', '.join(RESUME_MODES)}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps} must be >= 1")
        if self.eval_every_steps < 0:
            raise ValueError(f"eval_every_steps={self.eval_every_steps} must be >= 0")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device={self.device!r} must be cpu, cuda or cuda:N")
        if strategy in SWAPPED and L < 4:
            raise ValueError(
                f"recovery.strategy={strategy} needs model.num_stages >= 4 (it swaps the first two and "
                f"the last two stages), got model.num_stages={L}"
            )
        if self.pipeline.swap and L < 4:
            raise ValueError(f"pipeline.swap=true needs model.num_stages >= 4, got {L}")
        if strategy in SWAPPED and self.pipeline.swap is False:
            raise ValueError(
                f"recovery.strategy={strategy} rebuilds the first and last stages from their swap partners, "
                "but pipeline.swap=false trains no partner to stand in for them; use recovery.strategy=checkfree "
                "for CheckFree without the swap"
            )
        M, fraction = self.pipeline.num_microbatches, self.pipeline.swap_fraction
        if self.swap_enabled and swapped_count(M, fraction) == 0:
            raise ValueError(
                f"pipeline.swap_fraction={fraction} of pipeline.num_microbatches={M} swaps no microbatch, so no "
                f"stage learns to stand in for its swap partner; raise pipeline.swap_fraction to 1/{M} or more "
                "or pipeline.num_microbatches"
                + ("" if strategy != "checkfree_plus" else ", or use recovery.strategy=checkfree")
            )
        if strategy == "none" and self.failures.mode != "none":
            raise ValueError(
                f"recovery.strategy=none is the failure-free reference but failures.mode={self.failures.mode!r}; "
                "set failures.mode=none or pick a recovery strategy"
            )
        if self.failures.mode != "none" and L < 2:
            raise ValueError(f"failures need model.num_stages >= 2 to recover from a neighbour, got {L}")
        if strategy == "checkpoint" and self.checkpoint.every_steps == 0:
            raise ValueError("recovery.strategy=checkpoint needs checkpoint.every_steps >= 1")
        bad = [s for s in self.failures.stages or [] if not 0 <= s < L]
        if bad:
            raise ValueError(f"failures.stages={self.failures.stages}: {bad} out of range 0..{L - 1}")

    @property
    def swap_enabled(self) -> bool:
        if self.pipeline.swap is None:
            return self.recovery.strategy in SWAPPED
        return self.pipeline.swap

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_name


def _section_keys(path: list[str]) -> list[str]:
    """Field names of the config section at ``path`` (empty when the path is not a section)."""
    cls = TrainConfig
    for part in path:
        f = {f.name: f for f in fields(cls)}.get(part)
        if f is None or not callable(f.default_factory) or not is_dataclass(f.default_factory()):
            return []
        cls = type(f.default_factory())
    return [f.name for f in fields(cls)]


def _explain(e: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, ConfigKeyError):
        *section, name = key.split(".")
        allowed = _section_keys(section)
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f" Did you mean {'.'.join([*section, close[0]])!r}?" if close else ""
        where = ".".join(section) or "the top level"
        return ConfigError(f"{source}: unknown config key {key!r}.{hint} Keys allowed in {where}: {', '.join(allowed)}")
    if isinstance(e, MissingMandatoryValue):
        return ConfigError(f"{source}: config key {key!r} is required but has no value")
    if isinstance(e, ValidationError):
        msg = str(e).splitlines()[0]
        return ConfigError(f"{source}: bad value for config key {key!r}: {msg}")
    return ConfigError(f"{source}: {str(e).splitlines()[0]} (key {key!r})")


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Command-line arguments as (YAML files, ``key=value`` overrides)."""
    return [a for a in args if "=" not in a], [a for a in args if "=" in a]


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> TrainConfig:
    """Merge defaults < YAML ``files`` < ``overrides`` (``key=value``) into a checked ``TrainConfig``.

    Raises:
        ConfigError: naming the offending key, value and source.
    """
    merged = OmegaConf.structured(TrainConfig)
    for path in files:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = OmegaConf.load(p)
        except (yaml.YAMLError, OSError) as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as e:
            raise _explain(e, str(path)) from e
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad}")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _explain(e, "command line" if overrides else "config") from e
    except ValueError as e:
        raise ConfigError(str(e)) from e
    assert isinstance(cfg, TrainConfig)
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
