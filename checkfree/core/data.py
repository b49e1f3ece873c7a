"""
Data
====

Byte-level token streams with a held-out validation split, and batches that are a pure function of
(seed, step, microbatch): the first stage can read a microbatch's inputs and the last stage its targets
independently, in different processes, and a redone step sees exactly the same data.

Sources:
- ``stdlib``: the Python standard library's own ``.py`` files, present on every machine with Python
  (real, varied text; no download). Split by file, so no document is in both splits.
- ``text``: a plain text file or a glob of files; split by file when there are several, else the last
  ``val_fraction`` of the bytes.
- ``tokens``: nanoGPT-style ``train.bin`` / ``val.bin`` of token ids in ``path``, as ``checkfree prepare`` writes
  them, with a ``meta.json`` that gives their ``dtype`` (``uint16`` or ``uint32``), the ``vocab_size`` and the
  tokenizer (see :func:`token_meta`). A folder without ``meta.json`` is read as ``uint16`` ids, so older nanoGPT
  folders (``prepare.py`` of its examples) work as they are; nothing then checks the vocabulary but the id range.

``data.path`` may be an fsspec URL (``s3://bucket/tokens``, ``gs://...``; credentials and endpoint from the
environment): its files are fetched once into ``~/.cache/checkfree/data`` (``$CHECKFREE_DATA_CACHE``) and read
from there, again only when one changed size.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from checkfree.core.seeding import hash_seed
from checkfree.core.storage import is_url, local_copy

SOURCES = ("stdlib", "text", "tokens")
META_FILE = "meta.json"
TOKEN_DTYPES = ("uint16", "uint32")


@dataclass
class DataConfig:
    source: str = "stdlib"  # one of: stdlib, text, tokens
    path: str | None = None  # text: a file or glob; tokens: a folder with train.bin and val.bin
    val_fraction: float = 0.05  # share of files (or of bytes, for one text file) held out for validation
    max_bytes: int = 8_000_000  # read at most this many bytes of text (stdlib/text sources)
    microbatch_size: int = 8  # sequences per microbatch
    num_val_batches: int = 8  # fixed validation batches scored at each evaluation

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r} is not one of {', '.join(SOURCES)}")
        if self.source in ("text", "tokens") and not self.path:
            raise ValueError(f"data.path is required when data.source={self.source!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        for name in ("max_bytes", "microbatch_size", "num_val_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 1")


class DataError(ValueError):
    """Missing, unreadable or too-small data."""


def is_val(name: str, val_fraction: float) -> bool:
    """Whether the document called ``name`` is held out: a stable hash, the same on every machine and run."""
    digest = hashlib.sha1(name.encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < val_fraction


def _split_files(files: list[tuple[str, bytes]], val_fraction: float) -> tuple[bytes, bytes]:
    train, val = [], []
    for name, content in files:
        (val if is_val(name, val_fraction) else train).append(content)
    if not val:  # tiny file sets: hold out the last file rather than nothing
        val.append(train.pop())
    elif not train:  # and train on the first rather than nothing (every name hashed to validation)
        train.append(val.pop(0))
    return b"\n".join(train), b"\n".join(val)


def _read_files(paths: list[Path], root: Path | None, max_bytes: int) -> list[tuple[str, bytes]]:
    files, total = [], 0
    for p in paths:
        try:
            content = p.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read data file {p}: {e}") from e
        files.append((str(p.relative_to(root)) if root else str(p), content))
        total += len(content)
        if total >= max_bytes:
            break
    return files


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, tuple[Path, ...]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = tuple(sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts))
    return root, paths


def _local(path: str) -> str:
    """``path`` itself, or for a URL (``s3://bucket/tokens``) the local copy to read instead."""
    if not is_url(path):
        return path
    try:
        return local_copy(path)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from e
    except OSError as e:  # the bucket unreachable, credentials refused
        raise DataError(f"data.path={path!r} cannot be fetched: {e}") from e


def token_meta(path: str | Path) -> dict | None:
    """The ``meta.json`` of a token folder, checked; None when the folder has none (an old nanoGPT folder).

    Keys read here: ``vocab_size`` (int >= 1) and ``dtype`` (``uint16`` or ``uint32``); ``checkfree prepare``
    also writes the tokenizer, token and document counts, an input hash and its settings.

    Raises:
        DataError: the file is unreadable, not valid JSON, not an object, or lacks or misstates a key.
    """
    f = Path(_local(str(path))) / META_FILE
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{f} is not a readable JSON file: {e}") from e
    if not isinstance(meta, dict):
        raise DataError(f"{f} must hold a JSON object, not {type(meta).__name__}")
    for key in ("vocab_size", "dtype"):
        if key not in meta:
            raise DataError(f"{f} lacks the key {key!r}")
    if meta["dtype"] not in TOKEN_DTYPES:
        raise DataError(f"{f}: dtype={meta['dtype']!r} is not one of {', '.join(TOKEN_DTYPES)}")
    if isinstance(meta["vocab_size"], bool) or not isinstance(meta["vocab_size"], int) or meta["vocab_size"] < 1:
        raise DataError(f"{f}: vocab_size={meta['vocab_size']!r} must be a positive integer")
    return meta


def vocab_size_from_meta(cfg: DataConfig) -> int | None:
    """The vocabulary size the data was prepared with (``meta.json``), or None: not a token folder, or no meta."""
    if cfg.source != "tokens" or not cfg.path:
        return None
    meta = token_meta(cfg.path)
    return None if meta is None else meta["vocab_size"]


def _token_file(f: Path, dtype: np.dtype, path: str) -> np.ndarray:
    if not f.is_file():
        raise DataError(f"data.path={path!r}: expected a token file {f} ({dtype.name}), not found")
    size = f.stat().st_size
    if size % dtype.itemsize:
        raise DataError(
            f"token file {f} has {size} bytes, not a multiple of {dtype.itemsize} ({dtype.name} ids): "
            "truncated, or written with another dtype than meta.json says"
        )
    if size == 0:  # np.memmap refuses an empty file; the length check in Batches names the problem
        return np.zeros(0, dtype=dtype)
    return np.memmap(f, dtype=dtype, mode="r")


def load_splits(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """Train and validation token arrays and a short description of where they came from (a ``data.path``
    URL is read from its local copy, see ``checkfree.core.storage.local_copy``)."""
    if cfg.path:
        cfg = dataclasses.replace(cfg, path=_local(cfg.path))
    if cfg.source == "tokens":
        folder = Path(cfg.path)
        meta = token_meta(folder)
        dtype = np.dtype(meta["dtype"] if meta else "uint16")
        train, val = (_token_file(folder / f"{split}.bin", dtype, cfg.path) for split in ("train", "val"))
        return train, val, f"tokens:{folder}"
    if cfg.source == "stdlib":
        root, paths = stdlib_files()
        if not paths:
            raise DataError(f"no .py files found in the standard library folder {root}")
        train, val = _split_files(_read_files(list(paths), root, cfg.max_bytes), cfg.val_fraction)
        desc = f"stdlib:{root}"
    else:
        paths = [Path(p) for p in sorted(glob.glob(os.path.expanduser(cfg.path), recursive=True))]
        paths = [p for p in paths if p.is_file()]
        if not paths:
            raise DataError(f"data.path={cfg.path!r} matches no readable file")
        files = _read_files(paths, None, cfg.max_bytes)
        if len(files) > 1:
            train, val = _split_files(files, cfg.val_fraction)
        else:
            content = files[0][1][: cfg.max_bytes]
            cut = int(len(content) * (1 - cfg.val_fraction))
            train, val = content[:cut], content[cut:]
        desc = f"text:{cfg.path}"
    return np.frombuffer(train, dtype=np.uint8), np.frombuffer(val, dtype=np.uint8), desc


class Batches:
    """Deterministic microbatches: ``inputs(step, mb)`` and ``targets(step, mb)`` agree by construction."""

    def __init__(self, cfg: DataConfig, seq_len: int, vocab_size: int, seed: int):
        self.cfg, self.seq_len, self.seed = cfg, seq_len, seed
        self.train, self.val, self.description = load_splits(cfg)
        for split, arr in (("train", self.train), ("val", self.val)):
            if len(arr) < seq_len + 2:
                raise DataError(
                    f"{split} split of {self.description} has {len(arr)} tokens; "
                    f"need at least model.seq_len + 2 = {seq_len + 2}"
                )
        prepared = vocab_size_from_meta(cfg)
        if prepared is not None and prepared != vocab_size:
            raise DataError(
                f"data.path={cfg.path} was prepared with vocab_size {prepared} ({META_FILE}) "
                f"but model.vocab_size={vocab_size}; set model.vocab_size={prepared}, or leave it unset in the "
                "config files and overrides (it then follows meta.json)"
            )
        top = max(int(self.train.max()), int(self.val.max()))
        if top >= vocab_size:
            raise DataError(f"data holds token id {top} but model.vocab_size={vocab_size}")

    def _offsets(self, split: str, step: int, microbatch: int) -> np.ndarray:
        arr = self.train if split == "train" else self.val
        rng = np.random.default_rng(hash_seed(self.seed, 0 if split == "train" else 1, step, microbatch))
        return rng.integers(0, len(arr) - self.seq_len - 1, size=self.cfg.microbatch_size)

    def _window(self, split: str, step: int, microbatch: int, shift: int) -> torch.Tensor:
        arr = self.train if split == "train" else self.val
        rows = [arr[o + shift : o + shift + self.seq_len] for o in self._offsets(split, step, microbatch)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T)

    def inputs(self, step: int, microbatch: int, split: str = "train") -> torch.Tensor:
        return self._window(split, step, microbatch, 0)

    def targets(self, step: int, microbatch: int, split: str = "train") -> torch.Tensor:
        return self._window(split, step, microbatch, 1)

    def tokens_per_microbatch(self) -> int:
        return self.cfg.microbatch_size * self.seq_len
