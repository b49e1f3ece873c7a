"""scripts/bench_swap_tax.py, run as a command (no test loads a script): the tax read from run directories
with known validation curves (targets, pairing by seed, censored seeds counted, Holm over the family), and the
dry run's cost."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from checkfree import __version__
from checkfree.analysis.sweep import RunSpec, train_args
from checkfree.config import load_config, to_yaml

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 40, 2
PLAIN = lambda s: 5 - 0.1 * s  # first evaluation (step 2) 4.8, best (step 40) 1.0
SWAP = {  # per seed: slower, a little slower, stuck at 2.0 (never reaches the 75% and 90% targets)
    0: lambda s: 5 - 0.08 * s,
    1: lambda s: 5 - 0.09 * s,
    2: lambda s: max(5 - 0.1 * s, 2.0),
}


def _fake_run(run_dir: Path, loss, overrides: list[str]) -> None:
    """A finished run with known validation losses and the config.yaml the script's plan gives it (so that
    --analyse-only, which takes only runs of the sweep's own config, accepts it)."""
    run_dir.mkdir(parents=True)
    spec = RunSpec(run_dir.name, (str(ROOT / "configs/bench.yaml"),), tuple(overrides))
    (run_dir / "config.yaml").write_text(to_yaml(load_config(list(spec.files), train_args(spec, run_dir.parent))))
    rows = [
        {"step": s - 1, "loss/val": loss(s), "time/train_s": 0.1 * s, "iteration": s - 1}
        for s in range(EVERY, STEPS + 1, EVERY)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"steps": STEPS, "train_s": 0.1 * STEPS, "final_val_loss": loss(STEPS), "checkfree_version": __version__}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def _script(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "scripts/bench_swap_tax.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_tax_from_known_curves(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out" / "swap_tax.json"
    fixed = [f"num_steps={STEPS}", f"eval_every_steps={EVERY}", "pipeline.num_microbatches=8", "failures.mode=none"]
    for seed, swap in SWAP.items():
        plain_args = [*fixed, "recovery.strategy=checkfree", "pipeline.swap=false", f"seed={seed}"]
        swap_args = [*fixed, "recovery.strategy=checkfree_plus", "pipeline.swap=true", "pipeline.swap_fraction=0.5"]
        _fake_run(runs / f"bench-plain-s{seed}", PLAIN, plain_args)
        _fake_run(runs / f"bench-swap0.5-lrx1-s{seed}", swap, [*swap_args, f"seed={seed}"])
    common = ["--configs", "configs/bench.yaml", "--fractions", "0.5", "--seeds", "0", "1", "2"]
    _script(
        *common,
        "--steps",
        str(STEPS),
        "--eval-every",
        str(EVERY),
        "--runs-dir",
        str(runs),
        "--out",
        str(out),
        "--analyse-only",
    )
    result = json.loads(out.read_text())
    # targets 4.8 - f * 3.8: 2.9, 1.95, 1.38; the plain run first reaches them at steps 22, 32, 38
    assert [result["rows"][0][f"target@{f}"] for f in (0.5, 0.75, 0.9)] == [
        4.8 - f * (4.8 - 1.0) for f in (0.5, 0.75, 0.9)
    ]
    assert [r["plain_steps@0.75"] for r in result["rows"]] == [32, 32, 32]
    never = STEPS + 1  # a censored seed counts here
    swap_steps = {0.5: [28, 24, 22], 0.75: [40, 34, never], 0.9: [never, never, never]}
    plain_steps = {0.5: 22, 0.75: 32, 0.9: 38}
    ratios = {c["target_frac"]: c for c in result["comparisons"] if c["what"] == "steps ratio"}
    for f, steps in swap_steps.items():
        assert [r[f"swap_steps@{f}"] for r in result["rows"]] == steps
        expected = math.exp(sum(math.log(s / plain_steps[f]) for s in steps) / 3)
        assert math.isclose(ratios[f]["t"]["estimate"], expected)
    assert [ratios[f]["censored"] for f in (0.5, 0.75, 0.9)] == [0, 1, 3]
    assert ratios[0.9]["within_goal"] == "no"  # even the lower bound 41/38 is above 1.05
    assert "lower bound" in ratios[0.75]["note"]
    [diff] = [c for c in result["comparisons"] if c["what"] == "final val difference"]
    assert math.isclose(diff["t"]["estimate"], (0.8 + 0.4 + 1.0) / 3)
    family = [c["p"] for c in result["comparisons"]]
    assert len(family) == 4 and all(c["p_holm"] >= c["p"] for c in result["comparisons"])
    md = out.with_suffix(".md").read_text()
    assert "| bench" in md and "lower bound" in md
    # a run of another config (here: another sweep's steps) is not analysed as if it were this sweep's
    (runs / "bench-swap0.5-lrx1-s1" / "config.yaml").write_text("num_steps: 600\n")
    argv = [*common, "--steps", str(STEPS), "--eval-every", str(EVERY), "--runs-dir", str(runs), "--analyse-only"]
    proc = subprocess.run(
        [sys.executable, "scripts/bench_swap_tax.py", *argv, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "1 runs are missing or are not of this sweep's config" in proc.stderr


def test_dry_run_costs_the_sweep_and_trains_nothing(tmp_path):
    runs = tmp_path / "runs"
    proc = _script(
        *("--configs", "configs/bench.yaml", "configs/deep.yaml", "--fractions", "0.5", "0.25"),
        *("--seeds", "0", "1", "--steps", "100", "--step-s", "0.5", "--jobs", "2", "--runs-dir", str(runs)),
        "--dry-run",
    )
    # per layout: 2 plain + 2 fractions x 2 seeds = 6 runs, each 100 x 0.5 s + 9 s start-up = 354 s
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert ["bench", "6", "6", "100", "0.5", "--step-s", "354"] in lines
    assert ["deep", "6", "6", "100", "0.5", "--step-s", "354"] in lines
    assert f"{2 * 354 / 2 / 3600:.1f} h" in proc.stdout
    assert not runs.exists()


def test_an_out_that_is_no_json_file_is_refused_by_name(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/bench_swap_tax.py", "--out", str(tmp_path), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "expected a .json file" in proc.stderr
