"""``checkfree swarm`` with ``device=cuda`` on a host with N GPUs (the count mocked: this machine has none) gives
peer k GPU k mod N, spares included, or ``swarm.devices`` in turn; a GPU the host lacks is refused before any
peer starts. The peers' command lines are recorded instead of run."""

import pytest

import launcher.local as local
from tests.helpers import tiny_config


class Recorder:
    def __init__(self, args, **kwargs):
        self.args, self.pid = args, 0
        Recorder.started.append(args)

    def poll(self):
        return 0


def _devices(tmp_path, monkeypatch, gpus: int, *overrides: str) -> list[str]:
    monkeypatch.setattr(local, "cuda_count", lambda: gpus)
    monkeypatch.setattr(local.subprocess, "Popen", Recorder)
    Recorder.started = []
    cfg = tiny_config(tmp_path, *overrides)
    swarm = local.LocalSwarm(cfg, tmp_path / "run", status=False)
    try:
        for stage in [0, 1, 2, 3, None, None]:
            swarm._start(stage)
    finally:
        swarm.membership.shutdown()
    return [a[a.index("--device") + 1] for a in Recorder.started]


def test_peer_k_gets_gpu_k_mod_n(tmp_path, monkeypatch):
    got = _devices(tmp_path, monkeypatch, 4, "device=cuda")
    assert got == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]


def test_swarm_devices_are_given_in_turn(tmp_path, monkeypatch):
    got = _devices(tmp_path, monkeypatch, 8, "device=cuda", "swarm.devices=[cuda:7,cuda:5]")
    assert got == ["cuda:7", "cuda:5"] * 3


def test_on_cpu_every_peer_runs_on_the_cpu(tmp_path, monkeypatch):
    assert _devices(tmp_path, monkeypatch, 0) == ["cpu"] * 6


def test_a_gpu_the_host_lacks_is_refused_before_any_peer_starts(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"cuda:5.* does not exist: this host has 2 visible"):
        _devices(tmp_path, monkeypatch, 2, "device=cuda", "swarm.devices=[cuda:0,cuda:5]")
    assert Recorder.started == []
