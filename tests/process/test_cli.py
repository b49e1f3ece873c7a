import json
import subprocess
import sys

import pytest

from tests.helpers import TINY


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "checkfree", *args], cwd=cwd, capture_output=True, text=True, timeout=240
    )


def test_help_of_each_command(tmp_path):
    for args in ([], ["train"], ["plot"]):
        out = _cli(*args, "--help", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
    assert "key=value" in _cli("train", "--help", cwd=tmp_path).stdout
    assert "RUN_DIR" in _cli("plot", "--help", cwd=tmp_path).stdout


def test_swarm_help_lists_every_exit_code(tmp_path):
    from checkfree.core.exit_codes import ExitCode

    out = _cli("swarm", "--help", cwd=tmp_path).stdout
    for code in ExitCode:
        assert f"{int(code):3d}  {code.name.lower().replace('_', ' ')}:" in out


def test_train_then_plot(tmp_path):
    common = [
        *TINY,
        "num_steps=6",
        "num_threads=1",
        "failures.mode=per_step",
        "failures.per_step_prob=0.2",
        "plot=true",
    ]
    out = _cli("train", *common, "run_name=a", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "6 steps" in out.stdout and "recoveries" in out.stdout
    run = tmp_path / "runs" / "a"
    assert (run / "loss.png").stat().st_size > 10_000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["failures"] == summary["recoveries"] >= 1
    out = _cli("train", *common, "run_name=b", "recovery.strategy=checkfree", "progress=false", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = _cli("plot", str(run), str(tmp_path / "runs" / "b"), "--out", str(tmp_path / "both.png"), cwd=tmp_path)
    assert out.returncode == 0 and (tmp_path / "both.png").stat().st_size > 10_000


def test_bad_input_exits_2_with_a_message_and_no_run_dir(tmp_path):
    out = _cli("train", "model.num_layer=3", cwd=tmp_path)
    assert out.returncode == 2 and "Did you mean 'model.num_layers'" in out.stderr
    out = _cli("train", "data.source=text", "data.path=/nonexistent/*.txt", cwd=tmp_path)
    assert out.returncode == 2 and "matches no readable file" in out.stderr
    assert not (tmp_path / "runs").exists()
    out = _cli("plot", str(tmp_path / "nothing"), cwd=tmp_path)
    assert out.returncode == 2 and "not a run directory" in out.stderr
    out = _cli("swarm", "recovery.strategy=redundant", "pipeline.swap=true", cwd=tmp_path)
    assert out.returncode == 2 and "needs the plain route; set pipeline.swap=false" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_a_peer_whose_launcher_is_already_gone_exits_at_once(tmp_path):
    """The launcher can die between starting a peer and the peer asking to follow it: the peer sees that its
    parent is not the launcher it was told about and leaves before joining anything."""
    out = _cli(
        "peer",
        "--stage",
        "0",
        "--parent-pid",
        "999999999",
        "--initial-peers",
        "/ip4/127.0.0.1/tcp/9/p2p/x",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "runs").exists()


def test_joining_without_the_token_or_with_a_bad_one_exits_2_saying_what_is_expected(tmp_path):
    """Nothing starts (no DHT, no run dir files but the peer's folder) and the token is never echoed."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("CHECKFREE_JOIN_TOKEN", "CHECKFREE_SWARM_ID")}
    join = [
        "peer",
        *TINY,
        "--spare",
        "--run-dir",
        str(tmp_path / "run"),
        "--initial-peers",
        "/ip4/127.0.0.1/tcp/9/p2p/x",
    ]

    def cli(*args, extra_env=None):
        return subprocess.run(
            [sys.executable, "-m", "checkfree", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
            env={**env, **(extra_env or {})},
        )

    out = cli(*join)
    assert out.returncode == 2 and "needs its join token: pass --join-token or set $CHECKFREE_JOIN_TOKEN" in out.stderr
    secret = "cfj1_" + "x" * 40 + "!?"
    out = cli(*join, extra_env={"CHECKFREE_JOIN_TOKEN": secret})
    assert out.returncode == 2 and "the join token is not valid (47 characters)" in out.stderr
    assert secret not in out.stderr
    from checkfree.swarm.admission import new_token

    out = cli(*join, extra_env={"CHECKFREE_JOIN_TOKEN": new_token()})
    assert out.returncode == 2 and "needs its swarm id: pass --swarm-id or set $CHECKFREE_SWARM_ID" in out.stderr
    out = cli(*join, extra_env={"CHECKFREE_JOIN_TOKEN": new_token(), "CHECKFREE_SWARM_ID": "xyz"})
    assert out.returncode == 2 and "swarm id 'xyz' is not valid" in out.stderr
    swarm = {"CHECKFREE_SWARM_ID": "0" * 32}
    out = cli(*join, "--peer-id", "a.b", extra_env={"CHECKFREE_JOIN_TOKEN": new_token(), **swarm})
    assert out.returncode == 2 and "peer name 'a.b' is not valid" in out.stderr
    out = cli("status", "--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/x")
    assert out.returncode == 2 and "sealed with its join token" in out.stderr
    # a valid token, but no live peer at the address: nothing starts, and it says so (no traceback)
    dead = "/ip4/127.0.0.1/tcp/9/p2p/QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z"
    out = cli(*join[:-1], dead, extra_env={"CHECKFREE_JOIN_TOKEN": new_token(), **swarm})
    assert out.returncode == 2 and "could not join the DHT through " + dead in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_version_logging_options_after_the_subcommand_and_config_show(tmp_path):
    from checkfree import __version__

    out = _cli("--version", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"checkfree {__version__}"
    out = _cli("config", "show", "-v", "--log-level", "info", "model.d_model=48", "--docs", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "d_model: 48  # residual width" in out.stdout
    out = _cli("config", "show", "model.d_mdel=48", cwd=tmp_path)
    assert out.returncode == 2 and "Did you mean 'model.d_model'" in out.stderr
    (tmp_path / "list.yaml").write_text("- a\n")
    out = _cli("train", str(tmp_path / "list.yaml"), cwd=tmp_path)
    assert out.returncode == 2 and "top level" in out.stderr and "Traceback" not in out.stderr
    from checkfree.core.recovery import STRATEGIES

    assert ", ".join(STRATEGIES) in _cli("train", "--help", cwd=tmp_path).stdout


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.d_model=8192", "model.num_heads=8", "data.microbatch_size=512"], "this config cannot fit: stage 0:"),
        (["membership.announce_host=203.0.113.9"], "announce_host=203.0.113.9 is on no interface of this host"),
        (["device=cuda:1"], "device='cuda:1'"),
    ],
    ids=["memory", "address", "device"],
)
def test_a_peer_that_cannot_run_here_exits_2_before_starting_anything(tmp_path, overrides, message):
    """A stage too large for the host's memory, an address on no interface (a cloud VM's public one), a GPU
    that is not there: said at once, exit 2, no DHT started and nothing written in the run directory."""
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "checkfree", "peer", *TINY, *overrides, "--stage", "0", "--run-dir", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not run.exists()
