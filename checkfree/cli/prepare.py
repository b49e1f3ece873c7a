"""
``checkfree prepare``
=====================

A user's text files or JSONL to the token shards ``checkfree train data.source=tokens data.path=DIR`` reads.
"""

from __future__ import annotations

import argparse
import sys

from checkfree.core.exit_codes import ExitCode

PREPARE_HELP = """\
Tokenize text into train.bin / val.bin token shards with a meta.json (and the tokenizer.json that made
them), split by document. Inputs are files or quoted globs: a text file (.txt, .py, .md, any UTF-8) is
one document; a .jsonl file holds one document per line (its text under --jsonl-field, default "text";
giving --jsonl-field reads every input as JSONL). A single text file is cut by bytes instead.

  checkfree prepare 'notes/**/*.md' --out data/notes                 # bytes: vocabulary 256
  checkfree prepare stories.jsonl --jsonl-field text --train-bpe 4096 --out data/stories
  checkfree prepare 'src/**/*.py' --tokenizer gpt2/tokenizer.json --out data/code

Then: checkfree train data.source=tokens data.path=DIR (model.vocab_size follows meta.json).
"""


def cmd_prepare(ns: argparse.Namespace) -> int:
    from checkfree import __version__
    from checkfree.core.prepare import PrepareError, PrepareSettings, prepare
    from checkfree.core.tokenizer import TokenizerError

    try:
        settings = PrepareSettings(
            inputs=tuple(ns.inputs),
            out_dir=ns.out,
            tokenizer=ns.tokenizer,
            train_bpe=ns.train_bpe,
            jsonl_field=ns.jsonl_field,
            exclude=tuple(ns.exclude),
            val_fraction=ns.val_fraction,
            seed=ns.seed,
            min_split_tokens=ns.min_split_tokens,
        )
        meta = prepare(settings, version=__version__, progress=ns.progress)
    except (PrepareError, TokenizerError) as e:
        print(f"checkfree prepare: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except OSError as e:  # a full disk, an unreadable file: the shards' temporaries are removed
        print(f"checkfree prepare: {e}; no shard of this run was kept in {ns.out}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        print(f"checkfree prepare: interrupted; no shard of this run was kept in {ns.out}", file=sys.stderr)
        return ExitCode.INTERRUPTED
    print(summary(meta, ns.out))
    return ExitCode.OK


def summary(meta: dict, out: str) -> str:
    """The one-line result and the command that trains on it."""
    tokens, docs = meta["tokens"], meta["documents"]
    return (
        f"prepared {tokens['train']:,} train tokens ({docs['train']:,} documents) and {tokens['val']:,} val tokens "
        f"({docs['val']:,} documents), tokenizer {meta['tokenizer']['name']}, vocab_size {meta['vocab_size']}, "
        f"{meta['dtype']}, in {out}\n"
        f"train on it: checkfree train data.source=tokens data.path={out}"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "prepare",
        parents=[common],
        help="tokenize text files or JSONL into token shards for data.source=tokens",
        description=PREPARE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text or JSONL files, or quoted globs ('docs/**/*.md')")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for train.bin, val.bin, meta.json")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--tokenizer", metavar="bytes|PATH", help="'bytes' (default) or a Hugging Face tokenizer.json (file or folder)"
    )
    which.add_argument(
        "--train-bpe",
        type=_positive_int,
        metavar="VOCAB_SIZE",
        help="train a byte-level BPE of at most this many tokens on the training documents",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out files whose absolute path matches (repeatable; '*' crosses folders): '*/site-packages/*'",
    )
    p.add_argument("--jsonl-field", metavar="FIELD", help="read every input as JSONL, the text under FIELD")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="changes which documents are held out (default 0)")
    p.add_argument(
        "--min-split-tokens",
        type=_positive_int,
        default=1024,
        help="refuse a split with fewer tokens (default 1024; training needs model.seq_len + 2)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars on stderr")
    p.set_defaults(func=cmd_prepare)
