"""
Tokenizers
==========

Text to token ids and back, for ``checkfree prepare`` (which writes token shards) and for anything that must
read a model's ids as text again (``checkfree generate``). Three kinds, one small interface
(:class:`Tokenizer`: ``name``, ``vocab_size``, ``eot_id``, ``encode``, ``decode``):

- :class:`ByteTokenizer`: the ids are the text's UTF-8 bytes (vocabulary 256, no end-of-text id); what the
  ``stdlib`` and ``text`` data sources feed the model.
- :class:`HFTokenizer`: a local Hugging Face ``tokenizer.json`` (GPT-2's, LLaMa's, one trained here), read with the
  ``tokenizers`` library. Nothing is downloaded.
- :func:`train_bpe`: a byte-level BPE trained on the corpus itself and saved as ``tokenizer.json``.

:func:`tokenizer_for_data` answers "which tokenizer made this run's data?" from the data config (and, for
``data.source=tokens``, the ``meta.json`` that ``checkfree prepare`` wrote beside the shards).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from checkfree.core.data import DataConfig, DataError, token_meta

EOT_TOKEN = "<|endoftext|>"  # the end-of-text token train_bpe adds (GPT-2's spelling)
# End-of-document tokens of common tokenizer.json files, looked up in this order when none is named.
KNOWN_EOT_TOKENS = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
TOKENIZER_FILE = "tokenizer.json"
MIN_BPE_VOCAB = 257  # the 256 byte symbols of the initial alphabet plus the end-of-text token


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded, trained or named."""


class Tokenizer:
    """What every tokenizer offers. ``eot_id`` is the end-of-document id, or None when the vocabulary has none."""

    name: str
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Several texts at once (a tokenizer may do this faster than one by one)."""
        return [self.encode(t) for t in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids. Decoding replaces a cut-off multi-byte character with U+FFFD rather than failing."""

    name = "bytes"
    vocab_size = 256
    eot_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise TokenizerError(f"byte tokenizer: id {bad[0]} is not a byte (expected 0..255)")
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` read from a local file.

    Args:
        path: the ``tokenizer.json`` file.
        eot_token: the end-of-document token's text; by default the first of ``KNOWN_EOT_TOKENS`` the
            vocabulary holds (None when it holds none of them).
        name: a short name for logs and meta.json; by default the model type and vocabulary size (``bpe-4096``).

    Raises:
        TokenizerError: the file is missing, unreadable or not a tokenizer, or ``eot_token`` is not in it.
    """

    def __init__(self, path: str | Path, eot_token: str | None = None, name: str | None = None):
        self.path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust side raises a bare Exception for both I/O and parse errors
            raise TokenizerError(f"cannot load tokenizer file {self.path}: {e}") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eot_id = self._find_eot(eot_token)
        self.name = name or f"{type(self._tok.model).__name__.lower()}-{self.vocab_size}"

    def _find_eot(self, eot_token: str | None) -> int | None:
        if eot_token is not None:
            eot = self._tok.token_to_id(eot_token)
            if eot is None:
                raise TokenizerError(f"tokenizer file {self.path} has no token {eot_token!r} (the end-of-text token)")
            return eot
        for token in KNOWN_EOT_TOKENS:
            eot = self._tok.token_to_id(token)
            if eot is not None:
                return eot
        return None

    def encode(self, text: str) -> list[int]:
        # no post-processor specials: a BERT-style [CLS]/[SEP] around each batch of text would be noise in the stream
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        # specials are kept, so a generated end-of-text shows as such instead of vanishing
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> Path:
        """Write this tokenizer as a ``tokenizer.json`` at ``path``."""
        self._tok.save(str(path))
        return Path(path)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    path: str | Path,
    *,
    min_frequency: int = 2,
    length: int | None = None,
    show_progress: bool = False,
) -> HFTokenizer:
    """A byte-level BPE (GPT-2's scheme: every byte is a symbol, so any text encodes) trained on ``texts``.

    The texts are consumed once, as a stream, so a corpus larger than memory trains too (the trainer keeps
    word counts, not text). The result is saved to ``path`` (a ``tokenizer.json``) and loaded back from it.
    A small corpus can give fewer than ``vocab_size`` tokens: ``vocab_size`` is a ceiling.

    Args:
        texts: documents (or any chunks of text; merges never cross a chunk's edge).
        vocab_size: the largest vocabulary wanted, end-of-text token included (at least 257).
        path: where to save ``tokenizer.json``.
        min_frequency: a pair seen fewer times is not merged.
        length: the number of texts, for the trainer's progress bar only.
        show_progress: the trainer's own progress bar on stderr.

    Raises:
        TokenizerError: ``vocab_size`` below 257, or ``path`` not writable.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise TokenizerError(
            f"BPE vocab_size={vocab_size} is too small: a byte-level BPE needs at least {MIN_BPE_VOCAB} "
            "(256 bytes + the end-of-text token)"
        )
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_strings(texts), trainer=trainer, length=length)
    try:
        tok.save(str(path))
    except Exception as e:
        raise TokenizerError(f"cannot save the trained tokenizer to {path}: {e}") from e
    return HFTokenizer(path, eot_token=EOT_TOKEN)


def _strings(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if not isinstance(t, str):
            raise TokenizerError(f"train_bpe: expected text (str), got {type(t).__name__}")
        yield t


def load_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"``, a ``tokenizer.json`` file, or a folder holding one (as ``checkfree prepare --out`` writes)."""
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"tokenizer {spec!r}: expected 'bytes' or a {TOKENIZER_FILE} file; {path} is not a file")
    return HFTokenizer(path)


def tokenizer_for_data(data_cfg: DataConfig) -> Tokenizer:
    """The tokenizer a run's data was made with.

    ``stdlib`` and ``text`` sources are bytes. A ``tokens`` folder names its tokenizer in ``meta.json``
    (written by ``checkfree prepare``, the ``tokenizer.json`` saved beside the shards).

    Raises:
        TokenizerError: a ``tokens`` folder without ``meta.json`` (old nanoGPT folders do not say which
            tokenizer made them), or whose tokenizer file is missing or unreadable.
        DataError: a ``meta.json`` that is not valid JSON or lacks keys.
    """
    if data_cfg.source != "tokens":
        return ByteTokenizer()
    folder = Path(data_cfg.path)
    meta = token_meta(folder)
    if meta is None:
        raise TokenizerError(
            f"data.path={data_cfg.path!r} has no meta.json, so its tokenizer is unknown "
            "(folders made by `checkfree prepare` have one)"
        )
    info = meta.get("tokenizer")
    if not isinstance(info, dict) or "kind" not in info:
        raise DataError(f"{folder / 'meta.json'}: key 'tokenizer' must be an object with a 'kind'")
    if info["kind"] == "bytes":
        return ByteTokenizer()
    if not info.get("file"):
        raise DataError(f"{folder / 'meta.json'}: key 'tokenizer.file' is missing for tokenizer kind {info['kind']!r}")
    return HFTokenizer(folder / info["file"], eot_token=info.get("eot_token"), name=info.get("name"))


def describe(tok: Tokenizer) -> dict:
    """The ``tokenizer`` entry of meta.json for ``tok`` (its file name is added by whoever saves the file)."""
    if isinstance(tok, ByteTokenizer):
        return {"kind": "bytes", "name": tok.name, "file": None, "eot_token": None}
    assert isinstance(tok, HFTokenizer), type(tok)
    eot_token = tok._tok.id_to_token(tok.eot_id) if tok.eot_id is not None else None
    return {"kind": "hf", "name": tok.name, "file": TOKENIZER_FILE, "eot_token": eot_token}
