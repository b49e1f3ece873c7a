"""BPE tokens of this Python's standard-library sources, for ``configs/bpe5m.yaml`` (issue 22 item 5).

The machine reaches no hub, so the largest-scale comparison trains on text every machine has: the ``.py``
files of the running interpreter's standard library (site-packages left out), one document per file, through
``checkfree prepare`` with a byte-level BPE trained on them. The same as

    checkfree prepare "$STDLIB/**/*.py" --exclude '*/site-packages/*' --train-bpe 4096 --out runs/data/stdlib-bpe4096

with ``$STDLIB`` filled in without a shell, so that the benchmark registry can run it. Another Python version
has other sources: ``meta.json`` records their hash, and a run's config records the data folder it read.

    python scripts/prepare_stdlib_tokens.py --out runs/data/stdlib-bpe4096
"""

from __future__ import annotations

import argparse
import sysconfig

from checkfree.cli import main as checkfree


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/data/stdlib-bpe4096", help="folder for train.bin, val.bin, meta.json")
    ap.add_argument("--train-bpe", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    ap.add_argument("--seed", type=int, default=0, help="which documents are held out (default 0)")
    args = ap.parse_args(argv)
    stdlib = sysconfig.get_paths()["stdlib"]
    # checkfree prepare itself: its messages and exit codes for bad input, a full disk or Ctrl-C
    return checkfree(
        [
            "prepare",
            f"{stdlib}/**/*.py",
            "--exclude",
            "*/site-packages/*",
            "--train-bpe",
            str(args.train_bpe),
            "--seed",
            str(args.seed),
            "--out",
            args.out,
            "--no-progress",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
