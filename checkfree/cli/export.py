"""
``checkfree export`` and ``checkfree generate``
===============================================

The trained model out of a run directory: as a Hugging Face ``LlamaForCausalLM`` folder, or as text sampled
from it with the tokenizer the run's data was made with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from checkfree.core.exit_codes import ExitCode

FORMATS = ("hf",)
TOKENIZER_OPTION = "instead of the run's: bytes, a tokenizer.json, or a folder holding one (e.g. a moved token folder)"

EXPORT_HELP = """\
Write a run's trained weights (RUN_DIR/model.safetensors, written at the end of every run, or the
stages' parts in RUN_DIR/weights/ of a swarm) in another format:

  checkfree export runs/tiny --format hf --out tiny-hf

hf: a Hugging Face LlamaForCausalLM folder (config.json, model.safetensors) that computes the same
logits as checkfree; with tokenizer.json and tokenizer_config.json of the tokenizer the run's data was
made with (for byte-level data a tokenizer.json whose ids are the UTF-8 bytes). Load it with
transformers.LlamaForCausalLM.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR).
"""

GENERATE_HELP = """\
Continue a prompt with a run's trained model, encoded and decoded with the tokenizer the run's data was
made with (RUN_DIR/config.yaml says which), and print the prompt with its continuation:

  checkfree generate runs/tiny --prompt "def main(" --max-new-tokens 200
  checkfree generate runs/tiny --prompt "import " --temperature 0      # greedy

An empty prompt starts from the tokenizer's end-of-text token where it has one.
"""


def _fail(command: str, message: object) -> int:
    print(f"checkfree {command}: {message}", file=sys.stderr)
    return ExitCode.BAD_INPUT


def _run_config(run_dir: Path):
    """The run's resolved config (RUN_DIR/config.yaml). Raises ValueError when there is none or it is bad."""
    from checkfree.config import load_config

    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: it has no config.yaml")
    return load_config([path])


def _tokenizer(run_dir: Path, spec: str | None):
    """``--tokenizer`` where given, else the one the run's data was made with. Raises ValueError."""
    from checkfree.core.tokenizer import load_tokenizer, tokenizer_for_data

    if spec is not None:
        return load_tokenizer(spec)
    data = _run_config(run_dir).data
    if data.source == "tokens" and not Path(data.path).is_dir():
        raise ValueError(
            f"the run's data.path={data.path!r} (its token folder, which holds the tokenizer) is not a folder seen "
            f"from {Path.cwd()}: run from where training ran, or name the tokenizer with --tokenizer"
        )
    return tokenizer_for_data(data)


def cmd_export(ns: argparse.Namespace) -> int:
    from checkfree.core.hf_export import export_hf

    run_dir = Path(ns.run_dir)
    out = Path(ns.out) if ns.out else run_dir / "hf"
    if not run_dir.is_dir():
        return _fail("export", f"run directory {run_dir} does not exist")
    tokenizer, no_tokenizer = None, None
    try:
        tokenizer = _tokenizer(run_dir, ns.tokenizer)
    except ValueError as e:
        if ns.tokenizer is not None:
            return _fail("export", e)
        no_tokenizer = e  # the weights are still worth exporting: said after they are
    try:
        export_hf(run_dir, out, tokenizer)
    except (ValueError, OSError) as e:
        return _fail("export", e)
    if no_tokenizer is not None:
        print(f"checkfree export: warning: no tokenizer files written: {no_tokenizer}", file=sys.stderr)
    what = f"tokenizer {tokenizer.name}" if tokenizer is not None else "no tokenizer"
    print(f"wrote {out} (LlamaForCausalLM, {what})")
    return ExitCode.OK


def cmd_generate(ns: argparse.Namespace) -> int:
    from checkfree.core.generate import generate
    from checkfree.core.weights import load_weights

    run_dir = Path(ns.run_dir)
    try:
        tokenizer = _tokenizer(run_dir, ns.tokenizer)
        model_cfg, state, _ = load_weights(run_dir)
    except ValueError as e:
        return _fail("generate", e)
    prompt_ids = tokenizer.encode(ns.prompt)
    if not prompt_ids and tokenizer.eot_id is not None:
        prompt_ids = [tokenizer.eot_id]
    try:
        new = generate(
            model_cfg, state, prompt_ids, ns.max_new_tokens, ns.temperature, ns.top_k, ns.seed, tokenizer.eot_id
        )
        text = tokenizer.decode(new)
    except ValueError as e:
        return _fail("generate", f"{e} (tokenizer {tokenizer.name}, prompt {ns.prompt!r})")
    print(ns.prompt + text)
    return ExitCode.OK


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    export = sub.add_parser(
        "export",
        parents=[common],
        help="write a run's trained model as a Hugging Face LlamaForCausalLM",
        description=EXPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--format", choices=FORMATS, default="hf", help="output format (default hf)")
    export.add_argument("--out", metavar="DIR", help="folder to write (default RUN_DIR/hf)")
    export.add_argument("--tokenizer", metavar="SPEC", help=f"tokenizer files to write {TOKENIZER_OPTION}")
    export.set_defaults(func=cmd_export)
    gen = sub.add_parser(
        "generate",
        parents=[common],
        help="continue a prompt with a run's trained model",
        description=GENERATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("run_dir", metavar="RUN_DIR")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0: all (default 50)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    gen.add_argument("--tokenizer", metavar="SPEC", help=f"tokenizer {TOKENIZER_OPTION}")
    gen.set_defaults(func=cmd_generate)
