"""Checkpoints on object storage: two peers' stores on one ``s3://`` root, against moto's S3 server run in
this process (a thread on 127.0.0.1). Fake credentials, no metadata lookups, and a guard that fails any
connection to another address: nothing here reaches AWS."""

from __future__ import annotations

import socket

import pytest
import torch

from checkfree.core.checkpoint import CheckpointStore, StagePayload

moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')")
s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[s3]')")

BUCKET = "checkfree-test"


@pytest.fixture(scope="module")
def endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: a free one
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def storage_options(endpoint, monkeypatch, tmp_path):
    """What a peer passes to its store: the endpoint and credentials, explicitly; the environment can add nothing."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254 for credentials
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))  # the user's ~/.aws is not read
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def loopback_only(address) -> None:
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::ffff:127.0.0.1"):
            raise AssertionError(f"the S3 test tried to reach {address}: only the local server may be contacted")

    monkeypatch.setattr(socket.socket, "connect", lambda s, a: (loopback_only(a), real_connect(s, a))[1])
    monkeypatch.setattr(socket.socket, "connect_ex", lambda s, a: (loopback_only(a), real_connect_ex(s, a))[1])

    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "eu-west-1"},
        "skip_instance_cache": True,  # each store gets its own client and listings cache, as on separate hosts
    }
    fs = s3fs.S3FileSystem(**options)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    yield options
    for f in fs.find(BUCKET):
        fs.rm_file(f)


def _trained_payload(stage: int, step: int, seed: int) -> StagePayload:
    """A stage after real Adam steps: non-trivial moments and step counts to round-trip."""
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.Adam([w], lr=3e-4 * (stage + 1))
    for _ in range(2):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    return StagePayload(
        stage, step, {"blocks.0.w": w.detach().clone()}, opt.state_dict(), 3e-4 * (stage + 1), 1.25, 0.5
    )


def _assert_same(got: StagePayload, want: StagePayload) -> None:
    assert (got.stage, got.step, got.lr, got.grad_norm_raw, got.grad_norm_smoothed) == (
        want.stage,
        want.step,
        want.lr,
        want.grad_norm_raw,
        want.grad_norm_smoothed,
    )
    assert got.model.keys() == want.model.keys()
    assert all(torch.equal(got.model[k], want.model[k]) for k in want.model)
    assert got.optim["param_groups"] == want.optim["param_groups"]
    for k, state in want.optim["state"].items():
        assert state.keys() == got.optim["state"][k].keys()
        assert all(torch.equal(got.optim["state"][k][name], t) for name, t in state.items())


def test_two_peers_share_checkpoints_on_s3(storage_options):
    url = f"s3://{BUCKET}/run"
    peer_a = CheckpointStore(url, num_stages=2, keep=2, storage_options=storage_options)
    peer_b = CheckpointStore(url, num_stages=2, keep=2, storage_options=storage_options)
    assert peer_a.fs is not peer_b.fs
    assert (peer_a.complete_steps(), peer_b.latest_for_stage(0)) == ([], None)  # nothing under the prefix yet

    saved = {}
    for step in (10, 20, 30):
        saved[step] = (_trained_payload(0, step, seed=step), _trained_payload(1, step, seed=step + 1))
        peer_a.save_stage(saved[step][0])
        assert peer_b.latest_for_stage(0) == step and peer_b.complete_steps() == sorted(saved)[:-1]  # b's stage 1
        peer_b.save_stage(saved[step][1])
        assert peer_a.complete_steps() == peer_b.complete_steps() == sorted(saved)

    for step in (10, 30):
        for stage in (0, 1):
            _assert_same(peer_b.load_stage(step, stage), saved[step][stage])  # each peer reads the other's too
            _assert_same(peer_a.load_stage(step, stage), saved[step][stage])

    peer_a.prune()
    assert peer_b.complete_steps() == [20, 30]
    assert peer_b.fs.find(f"{BUCKET}/run/step_00000010") == []
    peer_b.prune()  # nothing left to delete: a no-op
    assert peer_a.complete_steps() == [20, 30]
    with pytest.raises(RuntimeError, match=rf"cannot load checkpoint s3://{BUCKET}/run/step_00000010/stage_1\.pt"):
        peer_a.load_stage(10, 1)


def test_a_half_saved_step_on_s3_is_not_complete(storage_options):
    store = CheckpointStore(f"s3://{BUCKET}/half", num_stages=3, storage_options=storage_options)
    store.save_stage(_trained_payload(0, 5, seed=0))
    store.save_stage(_trained_payload(2, 5, seed=2))
    assert store.complete_steps() == [] and store.latest_complete() is None
    assert (store.latest_for_stage(0), store.latest_for_stage(1)) == (5, None)


def test_checkfree_train_saves_to_s3_and_a_new_machine_resumes_from_it(storage_options, tmp_path):
    """The command line, as a user runs it: ``checkpoint.dir=s3://...`` with the endpoint in a config file, the
    credentials in the environment; the saves and prunes work, and the same command on another machine (an empty
    working folder) continues from the bucket."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.helpers import TINY

    options = {"client_kwargs": storage_options["client_kwargs"], "skip_instance_cache": True}
    cfg_file = tmp_path / "s3.yaml"
    cfg_file.write_text(yaml.safe_dump({"checkpoint": {"dir": f"s3://{BUCKET}/cli", "storage_options": options}}))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    args = [*TINY, "num_threads=1", "failures.mode=none", "checkpoint.every_steps=2", "checkpoint.keep=1"]

    def train(where, *more):
        where.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "checkfree", "train", str(cfg_file), *args, *more]
        return subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=240)

    first = train(tmp_path / "vm1", "num_steps=6")
    assert first.returncode == 0, first.stderr
    assert "cannot delete" not in first.stderr and "Traceback" not in first.stderr
    fs = s3fs.S3FileSystem(**storage_options)
    fs.invalidate_cache()
    steps = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/cli") if "step_" in p)
    assert steps == ["step_00000006"]  # keep=1: the older steps were pruned
    second = train(tmp_path / "vm2", "num_steps=8")
    assert second.returncode == 0, second.stderr
    assert "resumed at step 6" in second.stdout
