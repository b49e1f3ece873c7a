"""
Weights files
=============

The trained model as one file: ``RUN_DIR/model.safetensors`` (fp32) beside ``RUN_DIR/model.json``.

Tensors carry *global* names, independent of how the run was split into stages: ``embed.weight``,
``layers.{g}.<block parameter>`` (``g`` = the stage's first layer + the block's local index),
``norm.weight``, ``head.weight``. A file written by a 4-stage run loads into 1, 2 or 4 stages alike
(``stages_from_state``). The safetensors header holds everything needed to read the file back (format
version, checkfree version, step, the ``ModelConfig`` and the caller's ``meta``); ``model.json`` repeats it
for people and tools that do not read safetensors headers.

A swarm has no process holding every stage, so each stage's holder writes its own part,
``RUN_DIR/weights/stage_{i}.safetensors`` (``save_stage_part``, already under global names), and
``assemble_parts`` joins the parts into ``model.safetensors`` once all of them are there, at one step, of
one config. Every file is written to a temporary name in its folder and renamed: an interrupted write
never leaves a torn file under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from checkfree.core.model import Block, ModelConfig, Stage

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the files written here; bumped when names or metadata change meaning
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "model.json"
PARTS_DIR = "weights"
_PART_FILE = re.compile(r"stage_(\d+)\.safetensors")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


class WeightsError(ValueError):
    """A weights file or part that is missing, unreadable or does not fit the model it claims to hold."""


def checkfree_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("checkfree")
    except PackageNotFoundError:
        return "unknown"


# ---- names ----------------------------------------------------------------------------------------
def stage_to_global(sd: Mapping[str, torch.Tensor], first_layer: int) -> dict[str, torch.Tensor]:
    """A stage's state dict (local ``blocks.k.*``) under global names (``layers.{first_layer + k}.*``)."""
    out = {}
    for key, t in sd.items():
        m = _BLOCK_KEY.fullmatch(key)
        out[f"layers.{first_layer + int(m[1])}.{m[2]}" if m else key] = t
    return out


def global_to_stage(state: Mapping[str, torch.Tensor], stage: Stage) -> dict[str, torch.Tensor]:
    """The entries of a global state that belong to ``stage``, under its local names."""
    n = len(stage.blocks)
    out = {}
    for key, t in state.items():
        m = _LAYER_KEY.fullmatch(key)
        if m and stage.first_layer <= int(m[1]) < stage.first_layer + n:
            out[f"blocks.{int(m[1]) - stage.first_layer}.{m[2]}"] = t
        elif key.startswith("embed.") and stage.embed is not None:
            out[key] = t
        elif key.startswith(("norm.", "head.")) and stage.head is not None:
            out[key] = t
    return out


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every global name of the model and its shape (from the model's own modules, built on the meta device)."""
    with torch.device("meta"):
        block = {k: tuple(v.shape) for k, v in Block(cfg).state_dict().items()}
    shapes = {"embed.weight": (cfg.vocab_size, cfg.d_model)}
    for g in range(cfg.num_layers):
        shapes.update({f"layers.{g}.{k}": s for k, s in block.items()})
    shapes.update({"norm.weight": (cfg.d_model,), "head.weight": (cfg.vocab_size, cfg.d_model)})
    return shapes


def check_state(cfg: ModelConfig, state: Mapping[str, torch.Tensor], where: str, keys: set[str] | None = None) -> None:
    """Raise ``WeightsError`` unless ``state`` holds exactly ``keys`` (default: the whole model) with the
    shapes ``cfg`` gives them."""
    shapes = expected_shapes(cfg)
    keys = set(shapes) if keys is None else keys
    missing, unexpected = sorted(keys - set(state)), sorted(set(state) - keys)
    if missing or unexpected:
        raise WeightsError(
            f"{where} does not fit the model config (d_model={cfg.d_model}, num_layers={cfg.num_layers}, "
            f"vocab_size={cfg.vocab_size}): missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    wrong = [
        f"{k}: {tuple(state[k].shape)} (expected {shapes[k]})"
        for k in sorted(keys)
        if tuple(state[k].shape) != shapes[k]
    ]
    if wrong:
        raise WeightsError(f"{where} has tensors of the wrong shape: {', '.join(wrong[:5])}")


def stage_keys(cfg: ModelConfig, index: int, num_stages: int) -> set[str]:
    """The global names stage ``index`` of ``num_stages`` owns."""
    per = cfg.num_layers // num_stages
    keys = {
        k
        for k in expected_shapes(cfg)
        if (m := _LAYER_KEY.fullmatch(k)) and index * per <= int(m[1]) < (index + 1) * per
    }
    if index == 0:
        keys.add("embed.weight")
    if index == num_stages - 1:
        keys |= {"norm.weight", "head.weight"}
    return keys


def model_state(stages: list[Stage]) -> dict[str, torch.Tensor]:
    """The whole model's weights under global names, detached fp32 copies on the CPU."""
    state: dict[str, torch.Tensor] = {}
    for stage in stages:
        sd = stage_to_global(stage.state_dict(), stage.first_layer)
        state.update({k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()})
    return state


def stages_from_state(
    cfg: ModelConfig, state: Mapping[str, torch.Tensor], num_stages: int | None = None
) -> list[Stage]:
    """Stages holding ``state`` (global names), split into ``num_stages`` (default ``cfg.num_stages``).

    Raises:
        WeightsError: ``state`` is not the model ``cfg`` describes, or ``num_stages`` does not divide its layers.
    """
    num_stages = cfg.num_stages if num_stages is None else num_stages
    if num_stages < 1 or cfg.num_layers % num_stages:
        raise WeightsError(f"num_stages={num_stages} must be >= 1 and divide model.num_layers={cfg.num_layers}")
    check_state(cfg, state, "the weights")
    stages = [Stage(cfg, i, num_stages) for i in range(num_stages)]
    for stage in stages:
        stage.load_state_dict(global_to_stage(state, stage), strict=True)
    return stages


# ---- files ----------------------------------------------------------------------------------------
def config_hash(cfg: ModelConfig) -> str:
    """A short digest of the model config: parts of one model carry the same one."""
    return hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def atomic_write(final: Path, write: Callable[[Path], None]) -> Path:
    """Write ``final`` through ``write(tmp)`` to a temporary name in its folder, then rename it into place.

    Raises:
        OSError: naming ``final`` (the temporary is removed).
    """
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data reaches the disk before the rename makes it the real file
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as any file written here (safetensors makes its files owner-only)
        os.replace(tmp, final)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {final}: {e.strerror or e}") from e
    except SafetensorError as e:  # safetensors reports its I/O errors (a full disk) as its own type
        raise OSError(f"cannot write {final}: {e}") from e
    finally:
        with contextlib.suppress(OSError):  # gone after the rename; never there when the folder is not
            tmp.unlink(missing_ok=True)
    return final


def _write_tensors(final: Path, state: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    return atomic_write(final, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _write_json(final: Path, obj: dict) -> Path:
    return atomic_write(final, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def _header(cfg: ModelConfig, step: int, meta: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "checkfree_version": checkfree_version(),
        "step": step,
        "model": asdict(cfg),
        "meta": dict(meta),
    }


def _as_metadata(header: Mapping[str, Any]) -> dict[str, str]:
    # safetensors metadata is str -> str; "format": "pt" is what loaders such as transformers look for
    return {"format": "pt", **{k: json.dumps(v) for k, v in header.items()}}


def save_weights(
    run_dir: str | Path,
    stages_or_state: list[Stage] | Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    step: int,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``RUN_DIR/model.safetensors`` and ``RUN_DIR/model.json``; returns the safetensors path.

    Args:
        stages_or_state: the run's stages (any split) or a state under global names (``model_state``).
        step: committed optimizer steps the weights include.
        meta: JSON-serialisable facts to keep beside the weights (run name, the data's tokenizer).

    Raises:
        WeightsError: the weights are not the model ``model_cfg`` describes.
        OSError: the file could not be written (its path named); the previous file, if any, is intact.
    """
    state = model_state(stages_or_state) if isinstance(stages_or_state, list) else dict(stages_or_state)
    check_state(model_cfg, state, "the weights to save")
    header = _header(model_cfg, step, meta or {})
    path = _write_tensors(Path(run_dir) / WEIGHTS_FILE, state, _as_metadata(header))
    _write_json(Path(run_dir) / INFO_FILE, header)
    logger.info("wrote %s (step %d)", path, step)
    return path


def save_stage_part(
    run_dir: str | Path,
    stage_index: int,
    stage_state_dict: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    step: int,
    lineage: str,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write one stage's part, ``RUN_DIR/weights/stage_{i}.safetensors``, under global names.

    Args:
        stage_state_dict: the stage's own ``state_dict()`` (local ``blocks.k.*`` names), split as
            ``model_cfg.num_stages`` says.
        lineage: who wrote it, recorded as given (e.g. the swarm's run id and timeline); not compared.

    Raises:
        WeightsError: ``stage_index`` out of range, or the state dict is not that stage's.
        OSError: the part could not be written (its path named).
    """
    n = model_cfg.num_stages
    if not 0 <= stage_index < n:
        raise WeightsError(f"stage_index={stage_index} out of range 0..{n - 1} (model.num_stages={n})")
    state = stage_to_global(stage_state_dict, stage_index * model_cfg.layers_per_stage)
    check_state(model_cfg, state, f"stage {stage_index}'s state dict", stage_keys(model_cfg, stage_index, n))
    header = {
        **_header(model_cfg, step, meta or {}),
        "stage": stage_index,
        "num_stages": n,
        "lineage": lineage,
        "config_hash": config_hash(model_cfg),
    }
    return _write_tensors(Path(run_dir) / PARTS_DIR / f"stage_{stage_index}.safetensors", state, _as_metadata(header))


def _read_header(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise WeightsError(f"cannot read weights file {path}: {e}") from e
    try:
        header = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} has a header that is not checkfree's: {e}") from e
    if (
        not isinstance(header.get("format_version"), int)
        or not isinstance(header.get("step"), int)
        or "model" not in header
    ):
        raise WeightsError(f"{path} is not a checkfree weights file (its header has no format_version/step/model)")
    if header["format_version"] > FORMAT_VERSION:
        raise WeightsError(
            f"{path} has format version {header['format_version']}, newer than this checkfree reads "
            f"({FORMAT_VERSION}); upgrade checkfree"
        )
    return header


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise WeightsError(f"cannot read weights file {path}: {e}") from e


def _model_config(header: Mapping[str, Any], path: Path) -> ModelConfig:
    try:
        return ModelConfig(**header["model"])
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{path} holds a model config this checkfree cannot use: {e}") from e


def _parts(run_dir: Path) -> dict[int, Path]:
    folder = run_dir / PARTS_DIR
    found = {}
    if folder.is_dir():
        for p in folder.iterdir():
            if m := _PART_FILE.fullmatch(p.name):
                found[int(m[1])] = p
    return found


def _assemble(run_dir: Path, allow_mixed_steps: bool) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    parts = _parts(run_dir)
    if not parts:
        raise WeightsError(f"{run_dir / PARTS_DIR} holds no stage parts (stage_{{i}}.safetensors)")
    headers = {i: _read_header(p) for i, p in sorted(parts.items())}
    listing = ", ".join(
        f"{parts[i].name} (step {h['step']}, config {h.get('config_hash')})" for i, h in headers.items()
    )
    if len({(h.get("config_hash"), h.get("num_stages")) for h in headers.values()}) > 1:
        raise WeightsError(f"{run_dir / PARTS_DIR}: the parts are of different model configs: {listing}")
    first = headers[min(headers)]
    n = first.get("num_stages")
    if not isinstance(n, int) or set(parts) != set(range(n)):
        missing = sorted(set(range(n)) - set(parts)) if isinstance(n, int) else "?"
        raise WeightsError(
            f"{run_dir / PARTS_DIR}: the model has {n} stages, missing the parts of stages {missing}; found: {listing}"
        )
    steps = {i: h["step"] for i, h in headers.items()}
    if len(set(steps.values())) > 1:
        if not allow_mixed_steps:
            raise WeightsError(
                f"{run_dir / PARTS_DIR}: the parts are at different steps: {listing}; wait for every stage's "
                "holder to write the same step (or allow mixed steps)"
            )
        logger.warning("assembling parts at different steps: %s", listing)
    cfg = _model_config(first, parts[min(parts)])
    state: dict[str, torch.Tensor] = {}
    for i, p in sorted(parts.items()):
        part = _read_tensors(p)
        check_state(cfg, part, str(p), stage_keys(cfg, i, n))
        state.update(part)
    meta = {
        **first.get("meta", {}),
        "parts": {str(i): {"step": h["step"], "lineage": h.get("lineage")} for i, h in headers.items()},
    }
    info = {**first, "step": min(steps.values()), "meta": meta}
    return cfg, state, info


def assemble_parts(run_dir: str | Path, allow_mixed_steps: bool = False) -> Path:
    """Join ``RUN_DIR/weights/stage_*.safetensors`` into ``RUN_DIR/model.safetensors`` (+ ``model.json``).

    With ``allow_mixed_steps`` parts at different steps are joined anyway; the file's step is the oldest,
    and ``meta["parts"]`` records each part's step and lineage either way.

    Raises:
        WeightsError: a stage's part is missing or unreadable, or the parts are of different configs or
            (without ``allow_mixed_steps``) at different steps; the message lists every part with its step.
        OSError: the assembled file could not be written.
    """
    run_dir = Path(run_dir)
    cfg, state, info = _assemble(run_dir, allow_mixed_steps)
    return save_weights(run_dir, state, cfg, info["step"], info["meta"])


def load_weights(run_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """The model config, the state (global names) and the file's header (step, versions, ``meta``) of a run.

    Reads ``RUN_DIR/model.safetensors``; where only stage parts exist, joins them in memory (writing nothing).
    ``model.safetensors`` wins over parts; parts at a newer step than it are logged as a warning.

    Raises:
        WeightsError: no such directory, no weights in it, or a file that is not a checkfree model.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise WeightsError(f"run directory {run_dir} does not exist")
    path = run_dir / WEIGHTS_FILE
    if not path.is_file():
        if _parts(run_dir):
            return _assemble(run_dir, allow_mixed_steps=False)
        raise WeightsError(
            f"{run_dir} holds no weights: expected {WEIGHTS_FILE} (written at the end of a run) "
            f"or stage parts in {PARTS_DIR}/"
        )
    header = _read_header(path)
    cfg = _model_config(header, path)
    state = _read_tensors(path)
    check_state(cfg, state, str(path))
    newer = {}
    for i, p in _parts(run_dir).items():
        try:
            step = _read_header(p)["step"]
        except WeightsError as e:  # a torn part must not hide good weights: it is only a hint here
            logger.warning("ignoring an unreadable stage part: %s", e)
            continue
        if step > header["step"]:
            newer[i] = step
    if newer:  # e.g. a resumed swarm whose launcher stopped before it joined the new parts
        logger.warning(
            "%s is at step %d but the stage parts %s are newer (steps %s): assemble_parts joins them",
            path,
            header["step"],
            sorted(newer),
            sorted(set(newer.values())),
        )
    return cfg, state, {**header, "path": str(path)}
