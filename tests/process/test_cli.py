import json
import subprocess
import sys

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
