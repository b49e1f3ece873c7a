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

import ast
import difflib
import functools
import inspect
import textwrap
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from checkfree.core.checkpoint import CheckpointConfig
from checkfree.core.data import DataConfig, vocab_size_from_meta
from checkfree.core.failures import FailureConfig
from checkfree.core.metrics import MetricsConfig
from checkfree.core.model import ModelConfig
from checkfree.core.recovery import RecoveryConfig
from checkfree.core.schedule import PipelineConfig, swapped_count
from checkfree.core.stage_step import OptimConfig
from checkfree.core.strategies import SWAPPED
from checkfree.swarm.config import MembershipConfig, SwarmConfig, TransportConfig

RESUME_MODES = ("auto", "never")


class ConfigError(ValueError):
    """A configuration that must not start a run."""


def _default_failures() -> FailureConfig:
    # 16%/hour per stage, each step standing for the paper's medium-model iteration (91.3 s) seen 2x
    # faster: ~0.9% per stage per step, i.e. a handful of failures in the tiny run's 200 steps.
    return FailureConfig(mode="hourly", hourly_rate=0.16, iteration_time_s=91.3, time_acceleration=2.0)


PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    run_name: str = "tiny"  # run directory is OUT_DIR/RUN_NAME
    out_dir: str = "runs"  # folder that holds the run directories
    overwrite: bool = False  # start afresh in an existing run directory: its files and RUN_DIR/checkpoints are deleted
    # what to do with a run directory that already holds this run: auto (resume from its newest complete
    # checkpoint, or refuse when it has none), never (refuse; overwrite=true starts afresh instead)
    resume: str = "auto"
    seed: int = 0  # model init and data order
    num_steps: int = 200  # optimizer steps to commit
    eval_every_steps: int = 25  # validation loss every k committed steps (and at the end); 0: only at the end
    device: str = "cpu"  # cpu, cuda or cuda:N (a swarm: each peer its own GPU, see swarm.devices)
    # fp32, or bf16: autocast in bf16 with fp32 master weights and Adam state; activations and their gradients
    # cross the pipeline in bf16 (half the bytes); norms, the commit and every rebuild stay fp32
    precision: str = "fp32"
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
        if not self.run_name or self.run_name in (".", "..") or "/" in self.run_name or "\\" in self.run_name:
            raise ValueError(
                f"run_name={self.run_name!r} must be a plain folder name (not empty, no '/', not '.' or '..'): "
                "the run directory is OUT_DIR/RUN_NAME, and overwrite=true deletes it"
            )
        if self.resume not in RESUME_MODES:
            raise ValueError(f"resume={self.resume!r} must be one of {', '.join(RESUME_MODES)}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps} must be >= 1")
        if self.eval_every_steps < 0:
            raise ValueError(f"eval_every_steps={self.eval_every_steps} must be >= 0")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device={self.device!r} must be cpu, cuda or cuda:N")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
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
        suggestion = ".".join([*section, close[0]]) if close else None
        doc = config_docs().get(suggestion, ("", ""))[1] if suggestion else ""
        hint = f" Did you mean {suggestion!r}{f' ({doc})' if doc else ''}?" if close else ""
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
    """Merge defaults < YAML ``files`` < ``overrides`` (``key=value``) into a checked ``TrainConfig``. With
    ``data.source=tokens``, ``model.vocab_size`` follows the data's ``meta.json`` unless a file or an override
    sets it (a value that disagrees with the data is then refused when the data is opened).

    Raises:
        ConfigError: naming the offending key, value and source.
    """
    merged = OmegaConf.structured(TrainConfig)
    vocab_set = any(o.split("=", 1)[0].strip() == "model.vocab_size" for o in overrides)
    for path in files:
        loaded = _load_file(path)
        vocab_set = vocab_set or OmegaConf.select(loaded, "model.vocab_size", default=None) is not None
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as e:
            raise _explain(e, str(path)) from e
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad}")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        if not vocab_set and merged.data.source == "tokens" and merged.data.path:
            vocab = vocab_size_from_meta(DataConfig(source="tokens", path=merged.data.path))
            if vocab is not None:
                merged.model.vocab_size = vocab
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _explain(e, "command line" if overrides else "config") from e
    except ValueError as e:
        raise ConfigError(str(e)) from e
    assert isinstance(cfg, TrainConfig)
    return cfg


def _load_file(path: str | Path) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = OmegaConf.load(p)
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(loaded, DictConfig):
        raise ConfigError(
            f"config file {str(path)!r} holds a YAML {type(loaded).__name__.removesuffix('Config').lower()} at its "
            "top level; expected a mapping of config keys (e.g. 'num_steps: 100' and sections such as 'model:')"
        )
    return loaded


# keys a resumed run may change: how long and how it runs, not what it trains (the swarm's sections are the
# engine's to ignore; a swarm checks its own)
RESUME_MAY_CHANGE = (
    "num_steps",
    "eval_every_steps",
    "device",
    "precision",
    "num_threads",
    "progress",
    "plot",
    "overwrite",
    "resume",
    "out_dir",
    "run_name",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "checkpoint.dir",
    "checkpoint.storage_options",
    "metrics.",
    "membership.",
    "transport.",
    "swarm.",
)


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and not k.endswith("storage_options"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_mismatch(saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """The keys, with both values, on which ``cfg`` differs from the config a run was saved with, except those
    a resume may change (``RESUME_MAY_CHANGE``). Empty: ``cfg`` may continue that run."""
    a = _flat(OmegaConf.to_container(OmegaConf.structured(saved)))
    b = _flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    free = lambda k: any(k == m or (m.endswith(".") and k.startswith(m)) for m in RESUME_MAY_CHANGE)
    return [
        f"{k}: saved {a.get(k)!r}, now {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if not free(k) and a.get(k) != b.get(k)
    ]


def config_from_yaml(text: str, where: str) -> TrainConfig:
    """A ``TrainConfig`` from the YAML ``to_yaml`` wrote (a run directory's config.yaml, a resume state)."""
    try:
        loaded = OmegaConf.create(text)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), loaded))
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{where} does not hold a config of this checkfree version: {str(e).splitlines()[0]}") from e


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ---- the reference: one line of doc per key, read from the comments beside the dataclass fields ------------
def _field_comments(cls: type) -> dict[str, str]:
    """field name -> its comment in ``cls``'s source: the comment at the end of its line, else the comment
    lines right above it. The comments are the one source of the keys' docs (``checkfree config show --docs``,
    the unknown-key hint)."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    tree = ast.parse(textwrap.dedent("".join(lines)))
    out = {}
    for node in tree.body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.lineno - 1]
            doc = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            if not doc:
                above, i = [], node.lineno - 2
                while i >= 0 and lines[i].strip().startswith("#"):
                    above.insert(0, lines[i].strip().lstrip("#").strip())
                    i -= 1
                doc = " ".join(above)
            out[node.target.id] = doc
    return out


@functools.cache
def config_docs() -> dict[str, tuple[str, str]]:
    """Every config key (dotted) -> (its type, its one-line doc), in declaration order."""
    out: dict[str, tuple[str, str]] = {}

    def walk(cls: type, prefix: str) -> None:
        comments = _field_comments(cls)
        for f in fields(cls):
            factory = f.default_factory if f.default_factory is not MISSING else None
            if factory is not None and is_dataclass(default := factory()):
                walk(type(default), f"{prefix}{f.name}.")
                continue
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            out[f"{prefix}{f.name}"] = (kind, comments.get(f.name, ""))

    walk(TrainConfig, "")
    return out


def show(cfg: TrainConfig, docs: bool = False) -> str:
    """The resolved config as YAML; with ``docs``, each key followed by its type, default and doc as a comment."""
    text = to_yaml(cfg)
    if not docs:
        return text
    defaults = _flat(OmegaConf.to_container(OmegaConf.structured(TrainConfig)))
    table = config_docs()
    out, path = [], []
    for line in text.splitlines():
        stripped = line.lstrip()
        depth = (len(line) - len(stripped)) // 2
        key = stripped.split(":", 1)[0]
        if not stripped or stripped.startswith("-") or ":" not in stripped:
            out.append(line)
            continue
        path = [*path[:depth], key]
        dotted = ".".join(path)
        if dotted in table:
            kind, doc = table[dotted]
            line = f"{line}  # {doc} [{kind}, default {defaults.get(dotted)!r}]" if doc else line
        out.append(line)
    return "\n".join(out) + "\n"
