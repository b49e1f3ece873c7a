"""
Token preparation
=================

A user's text to the token shards that ``data.source=tokens`` reads: ``train.bin`` and ``val.bin`` (token ids,
``uint16`` when the vocabulary fits, else ``uint32``), the ``tokenizer.json`` that made them (when not bytes) and
``meta.json`` (tokenizer, vocabulary, dtype, counts, an input hash, the settings). ``checkfree prepare`` is
its command line.

Inputs are files or globs. A text file (``.txt``, ``.py``, ``.md``, anything, read as UTF-8 with undecodable
bytes replaced) is one document; a JSONL file (``.jsonl``/``.ndjson``, or every input when ``jsonl_field`` is
given) holds one document per line, its text under ``jsonl_field`` (default ``text``). The split is by
document: a stable hash of the document's name (the file's path below the corpus folder, plus ``:LINE``
for JSONL) and the seed decides, so no document is in both splits and a rerun gives the same
split. A single text file is one document and is cut instead: its last ``val_fraction`` of bytes (from a
line start) is the validation split. An end-of-text token follows every document when the tokenizer has
one, else a newline does.

Memory stays bounded on a corpus larger than RAM: files are read in pieces of about ``piece_bytes`` (cut
after a newline, so a cut rarely changes a token), encoded a bounded batch of pieces at a time and appended to
the shards. The shards are written under temporary names and renamed at the end, ``meta.json`` last: an
interrupted or failed prepare leaves no ``train.bin`` that looks complete. ``train_bpe`` trains the
tokenizer in a first pass over the training documents, then encodes in a second.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from checkfree.core.data import META_FILE, is_val
from checkfree.core.tokenizer import TOKENIZER_FILE, HFTokenizer, Tokenizer, describe, load_tokenizer, train_bpe

SPLITS = ("train", "val")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
UINT16_MAX_VOCAB = 2**16
TMP_SUFFIX = ".tmp"


class PrepareError(ValueError):
    """Inputs, settings or an output folder that a prepare cannot work with."""


@dataclass(frozen=True)
class Source:
    """One input file. ``key`` names it stably, wherever the corpus lies (see :func:`find_inputs`)."""

    path: Path
    key: str
    jsonl: bool
    size: int


@dataclass(frozen=True)
class Piece:
    """A run of one document's text. ``last``: the document ends here. ``split``: "train" or "val"."""

    doc: str
    text: str
    last: bool
    split: str


@dataclass(frozen=True)
class PrepareSettings:
    """What ``checkfree prepare`` was asked to do (recorded in meta.json)."""

    inputs: tuple[str, ...]
    out_dir: str
    tokenizer: str | None = None  # "bytes" or a tokenizer.json (file or folder); None: bytes unless train_bpe
    train_bpe: int | None = None  # train a byte-level BPE with at most this many tokens on the training documents
    jsonl_field: str | None = None  # every input is JSONL with the text under this field (.jsonl files: "text")
    exclude: tuple[str, ...] = ()  # glob patterns of paths to leave out ('*/site-packages/*'), matched on full paths
    val_fraction: float = 0.05  # share of documents held out (of bytes, for a single text file)
    seed: int = 0  # changes which documents are held out
    min_split_tokens: int = 1024  # a split with fewer tokens is an error (training needs model.seq_len + 2)
    batch_size: int = 256  # pieces of text encoded at once, at most
    batch_chars: int = 1 << 20  # characters encoded at once, at most (bounds the ids held in memory)
    piece_bytes: int = 1 << 20  # files are read in pieces of about this many bytes

    def __post_init__(self) -> None:
        if self.tokenizer is not None and self.train_bpe is not None:
            raise PrepareError(f"give either a tokenizer ({self.tokenizer!r}) or train_bpe={self.train_bpe}, not both")
        if not 0.0 < self.val_fraction < 1.0:
            raise PrepareError(f"val_fraction={self.val_fraction} must be in (0, 1)")
        for name in ("min_split_tokens", "batch_size", "batch_chars", "piece_bytes"):
            if getattr(self, name) < 1:
                raise PrepareError(f"{name}={getattr(self, name)} must be >= 1")
        if self.jsonl_field is not None and not self.jsonl_field:
            raise PrepareError("jsonl_field must name a field, not be empty")


def is_val_document(doc: str, s: PrepareSettings) -> bool:
    """Whether the document named ``doc`` is held out (a stable hash of the name and the seed)."""
    return is_val(f"{s.seed}:{doc}", s.val_fraction)


def _fixed_prefix(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard (``data/**/*.txt`` -> ``data``)."""
    fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), Path(pattern).parts))
    return Path(*fixed) if fixed else Path(".")


def find_inputs(inputs: list[str], jsonl_field: str | None, exclude: tuple[str, ...] = ()) -> list[Source]:
    """The files the inputs name, in order, each once.

    A file's key (which decides its split) does not depend on where the corpus lies or on who expanded a
    glob: a quoted ``'corpus/**/*.py'`` keys ``corpus/a/x.py`` as ``a/x.py`` (below the glob's fixed prefix),
    and so does the shell's expansion of it (below the folder the named files share). A file whose absolute
    path matches one of ``exclude`` (``fnmatch``: ``*`` crosses folders) is left out.

    Raises:
        PrepareError: an input that matches no file, or names a folder.
    """
    if not inputs:
        raise PrepareError("no input given: name text or JSONL files, or globs such as 'corpus/**/*.txt'")
    named = [os.path.abspath(os.path.expanduser(spec)) for spec in inputs if not glob.has_magic(spec)]
    common = os.path.commonpath([os.path.dirname(p) for p in named]) if named else ""
    sources, seen = [], set()
    for spec in inputs:
        pattern = os.path.expanduser(spec)
        if glob.has_magic(pattern):
            base = _fixed_prefix(pattern)
            paths = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
            keys = [p.relative_to(base).as_posix() if p.is_relative_to(base) else p.as_posix() for p in paths]
        elif os.path.isdir(pattern):
            raise PrepareError(f"input {spec!r} is a folder: give its files, or a glob such as '{spec}/**/*.txt'")
        else:
            paths = [Path(pattern)] if os.path.isfile(pattern) else []
            keys = [Path(os.path.relpath(os.path.abspath(pattern), common)).as_posix()]
        kept = [(p, k) for p, k in zip(paths, keys) if not any(fnmatch.fnmatch(str(p.resolve()), x) for x in exclude)]
        if not kept:
            left_out = f" once {list(exclude)} are left out" if paths else ""
            raise PrepareError(f"input {spec!r} matches no file{left_out}")
        for path, key in kept:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                jsonl = jsonl_field is not None or path.suffix.lower() in JSONL_SUFFIXES
                sources.append(Source(path, key, jsonl, path.stat().st_size))
    return sources


def _cut_point(path: Path, size: int, val_fraction: float) -> int:
    """The byte where one text file's validation part starts: after a newline near the ``val_fraction`` mark."""
    pos = int(size * (1 - val_fraction))
    with open(path, "rb") as f:
        f.seek(pos)
        tail = f.read(1 << 16)
    newline = tail.find(b"\n")
    if newline >= 0 and pos + newline + 1 < size:
        return pos + newline + 1
    k = 0  # no line start near the mark: at least do not cut a UTF-8 character in two
    while k < len(tail) and tail[k] & 0xC0 == 0x80:
        k += 1
    return pos + k


def _texts(f, start: int, end: int, piece_bytes: int, hasher, on_bytes: Callable[[int], None]) -> Iterator[str]:
    """Bytes ``[start, end)`` of an open file as text pieces, each cut after its last newline when it has one."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    f.seek(start)
    carry, left = "", end - start
    while left > 0:
        raw = f.read(min(piece_bytes, left))
        if not raw:
            break
        left -= len(raw)
        hasher.update(raw)
        on_bytes(len(raw))
        text = carry + decoder.decode(raw)
        cut = text.rfind("\n") + 1
        if cut == 0 and len(text) < 4 * piece_bytes:  # no newline yet: wait for one, up to a bound
            carry = text
            continue
        cut = cut or len(text)
        carry = text[cut:]
        yield text[:cut]
    text = carry + decoder.decode(b"", final=True)
    if text:
        yield text


def _text_pieces(src: Source, ranges: list[tuple[int, int, str]], piece_bytes: int, hasher, on_bytes):
    """The pieces of a text file's byte ranges, each range one document of the split it names."""
    try:
        with open(src.path, "rb") as f:
            for start, end, split in ranges:
                pending = None
                for text in _texts(f, start, end, piece_bytes, hasher, on_bytes):
                    if pending is not None:
                        yield Piece(src.key, pending, False, split)
                    pending = text
                if pending is not None:
                    yield Piece(src.key, pending, True, split)
    except OSError as e:
        raise PrepareError(f"cannot read input file {src.path}: {e}") from e


def _jsonl_pieces(src: Source, s: PrepareSettings, hasher, on_bytes) -> Iterator[Piece]:
    field = s.jsonl_field or "text"
    try:
        with open(src.path, "rb") as f:
            for number, line in enumerate(f, start=1):
                hasher.update(line)
                on_bytes(len(line))
                if not line.strip():
                    continue
                text = _jsonl_text(src.path, number, line, field)
                if text:
                    doc = f"{src.key}:{number}"
                    yield Piece(doc, text, True, "val" if is_val_document(doc, s) else "train")
    except OSError as e:
        raise PrepareError(f"cannot read input file {src.path}: {e}") from e


def _jsonl_text(path: Path, number: int, line: bytes, field: str) -> str:
    try:
        record = json.loads(line.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        raise PrepareError(f"{path}:{number}: not a valid JSON line ({e})") from e
    if not isinstance(record, dict) or field not in record:
        raise PrepareError(f"{path}:{number}: no field {field!r} in this JSON line (choose one with --jsonl-field)")
    text = record[field]
    if not isinstance(text, str):
        raise PrepareError(f"{path}:{number}: field {field!r} holds {type(text).__name__}, not text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escaped in the JSON ("\ud800"): no tokenizer takes it; it becomes "?"
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def read_pieces(sources: list[Source], s: PrepareSettings, hasher, on_bytes: Callable[[int], None]) -> Iterator[Piece]:
    """Every document of every source, in order, as pieces; the raw bytes (and names) go into ``hasher``."""
    single, held_out = _single_file(sources), _held_out_file(sources, s)
    for src in sources:
        hasher.update(src.key.encode() + b"\0")
        if src.jsonl:
            yield from _jsonl_pieces(src, s, hasher, on_bytes)
        elif src.size and single:
            cut = _cut_point(src.path, src.size, s.val_fraction)
            yield from _text_pieces(src, [(0, cut, "train"), (cut, src.size, "val")], s.piece_bytes, hasher, on_bytes)
        elif src.size:
            split = "val" if src.key == held_out or is_val_document(src.key, s) else "train"
            yield from _text_pieces(src, [(0, src.size, split)], s.piece_bytes, hasher, on_bytes)


def _held_out_file(sources: list[Source], s: PrepareSettings) -> str | None:
    """The text file held out when the hash holds out none of a few (as data.py's text source does)."""
    texts = [src.key for src in sources if src.size and not src.jsonl]
    if len(texts) < 2 or any(src.jsonl for src in sources) or any(is_val_document(k, s) for k in texts):
        return None
    return texts[-1]


def token_dtype(vocab_size: int) -> str:
    """The narrowest shard dtype that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= UINT16_MAX_VOCAB else "uint32"


def _single_file(sources: list[Source]) -> bool:
    """One text file: it is one document, so it is cut by bytes instead of split by document."""
    return len(sources) == 1 and not sources[0].jsonl and sources[0].size > 0


class ShardWriter:
    """Appends token ids to ``train.bin``/``val.bin`` under temporary names; ``commit`` renames, ``abort`` removes."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.dtype = np.dtype("uint16")  # set to token_dtype(vocab_size) before the first append
        self.tokens = dict.fromkeys(SPLITS, 0)
        self.documents = dict.fromkeys(SPLITS, 0)
        self._files = {s: open(self.tmp(f"{s}.bin"), "wb") for s in SPLITS}

    def tmp(self, name: str) -> Path:
        return self.out_dir / (name + TMP_SUFFIX)

    def append(self, split: str, ids: list[int], documents: int) -> None:
        np.asarray(ids, dtype=self.dtype).tofile(self._files[split])
        self.tokens[split] += len(ids)
        self.documents[split] += documents

    def _close(self) -> None:
        for f in self._files.values():
            f.close()

    def commit(self, extra: dict[str, bytes | Path]) -> None:
        """Rename the shards and ``extra`` files (name -> content, or a temporary file to move) into place."""
        self._close()
        (self.out_dir / META_FILE).unlink(missing_ok=True)  # an old meta.json must not describe new shards
        if TOKENIZER_FILE not in extra:  # nor an old tokenizer.json stand beside shards of another tokenizer
            (self.out_dir / TOKENIZER_FILE).unlink(missing_ok=True)
        for s in SPLITS:
            os.replace(self.tmp(f"{s}.bin"), self.out_dir / f"{s}.bin")
        for name, content in extra.items():  # meta.json comes last in ``extra``: it marks the folder complete
            if isinstance(content, bytes):
                self.tmp(name).write_bytes(content)
                content = self.tmp(name)
            os.replace(content, self.out_dir / name)

    def abort(self) -> None:
        self._close()
        for s in SPLITS:
            self.tmp(f"{s}.bin").unlink(missing_ok=True)


class _Progress:
    """A bytes progress bar on stderr (a no-op when disabled)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = tqdm(
            total=total, desc=desc, unit="B", unit_scale=True, disable=None if enabled else True, leave=False
        )

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _train_tokenizer(sources: list[Source], s: PrepareSettings, path: Path, progress: bool) -> tuple[HFTokenizer, str]:
    """Pass one: a BPE trained on the training documents; returns it and the inputs' hash as this pass saw them."""
    hasher = hashlib.sha256()
    total = sum(src.size for src in sources)
    with _Progress(total, "train BPE", progress) as bar:
        texts = (p.text for p in read_pieces(sources, s, hasher, bar) if p.split == "train")
        tok = train_bpe(texts, s.train_bpe, path)
    return tok, hasher.hexdigest()


def _encode(sources: list[Source], tok: Tokenizer, s: PrepareSettings, writer: ShardWriter, progress: bool) -> str:
    """Pass two: every document's ids appended to its split's shard; returns the inputs' hash."""
    hasher = hashlib.sha256()
    separator = [tok.eot_id] if tok.eot_id is not None else tok.encode("\n")
    with _Progress(sum(src.size for src in sources), "encode", progress) as bar:
        batch: list[Piece] = []
        chars = 0
        for piece in read_pieces(sources, s, hasher, bar):
            batch.append(piece)
            chars += len(piece.text)
            if len(batch) >= s.batch_size or chars >= s.batch_chars:
                _write_batch(batch, tok, s, writer, separator)
                batch, chars = [], 0
        _write_batch(batch, tok, s, writer, separator)
    return hasher.hexdigest()


def _write_batch(batch: list[Piece], tok: Tokenizer, s: PrepareSettings, writer: ShardWriter, separator) -> None:
    if not batch:
        return
    ids = {split: [] for split in SPLITS}
    documents = dict.fromkeys(SPLITS, 0)
    for piece, piece_ids in zip(batch, tok.encode_batch([p.text for p in batch])):
        ids[piece.split] += piece_ids
        if piece.last:
            ids[piece.split] += separator
            documents[piece.split] += 1
    for split in SPLITS:
        writer.append(split, ids[split], documents[split])


def _check_counts(writer: ShardWriter, s: PrepareSettings) -> None:
    if not writer.documents["train"] and not writer.documents["val"]:
        raise PrepareError(f"the inputs {list(s.inputs)} hold no text: an empty corpus")
    for split in SPLITS:
        if writer.tokens[split] < s.min_split_tokens:
            raise PrepareError(
                f"the {split} split has {writer.tokens[split]} tokens ({writer.documents[split]} documents); "
                f"need at least {s.min_split_tokens} (min_split_tokens): give more text, or change val_fraction "
                f"(now {s.val_fraction})"
            )


def _out_dir(path: str) -> Path:
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"cannot create the output folder {path}: {e}") from e
    if not os.access(out, os.W_OK):
        raise PrepareError(f"the output folder {path} is not writable")
    return out


def prepare(s: PrepareSettings, *, version: str | None = None, progress: bool = False) -> dict:
    """Token shards, tokenizer and meta.json in ``s.out_dir`` from ``s.inputs``; returns what meta.json holds.

    Args:
        s: the settings.
        version: checkfree's version, recorded in meta.json.
        progress: progress bars on stderr.

    Raises:
        PrepareError: no matching or an unreadable input, a bad JSON line, an empty corpus, a split with fewer
            than ``min_split_tokens`` tokens, an output folder that cannot be written, inputs changed between
            the passes.
        TokenizerError: a tokenizer file that cannot be loaded, a BPE vocabulary below 257.
    """
    sources = find_inputs(list(s.inputs), s.jsonl_field, s.exclude)
    tok = None if s.train_bpe is not None else load_tokenizer(s.tokenizer or "bytes")
    out = _out_dir(s.out_dir)
    writer = ShardWriter(out)  # its temporary files made now: an unwritable folder fails before any training
    try:
        extra: dict[str, bytes | Path] = {}
        if tok is None:
            tok, trained_hash = _train_tokenizer(sources, s, writer.tmp(TOKENIZER_FILE), progress)
            extra[TOKENIZER_FILE] = writer.tmp(TOKENIZER_FILE)
        elif isinstance(tok, HFTokenizer):
            shutil.copyfile(tok.path, writer.tmp(TOKENIZER_FILE))
            extra[TOKENIZER_FILE] = writer.tmp(TOKENIZER_FILE)
        writer.dtype = np.dtype(token_dtype(tok.vocab_size))
        inputs_hash = _encode(sources, tok, s, writer, progress)
        if s.train_bpe is not None and inputs_hash != trained_hash:
            raise PrepareError("the inputs changed while the tokenizer was trained on them: run prepare again")
        _check_counts(writer, s)
        meta = _meta(s, tok, writer, sources, inputs_hash, version)
        extra[META_FILE] = (json.dumps(meta, indent=2) + "\n").encode()
        writer.commit(extra)
    except BaseException:
        writer.abort()
        writer.tmp(TOKENIZER_FILE).unlink(missing_ok=True)
        raise
    return meta


def _meta(s: PrepareSettings, tok: Tokenizer, writer: ShardWriter, sources, inputs_hash: str, version) -> dict:
    return {
        "format": "checkfree-tokens/1",
        "tokenizer": describe(tok),
        "vocab_size": tok.vocab_size,
        "dtype": writer.dtype.name,
        "eot_id": tok.eot_id,
        "tokens": dict(writer.tokens),
        "documents": dict(writer.documents),
        "split": "bytes of one file" if _single_file(sources) else "documents",
        "inputs": {"files": len(sources), "bytes": sum(src.size for src in sources), "sha256": inputs_hash},
        "checkfree_version": version,
        "settings": {**vars(s), "inputs": list(s.inputs), "exclude": list(s.exclude)},
    }
