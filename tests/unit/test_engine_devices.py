"""The engine's device per stage (``core.devices.stage_devices`` with the GPUs this process sees): placement
with a mocked GPU count, the engine built from that function, and the trainer's refusal of a GPU it lacks.
This machine has no GPU, so the engine only ever trains on "cpu" here."""

import pytest
import torch

from checkfree.core.devices import DeviceError, stage_devices
from checkfree.core.metrics import read_jsonl
from checkfree.core.model import build_stages
from checkfree.engine import pipeline
from checkfree.engine.pipeline import PipelineEngine
from checkfree.engine.trainer import Trainer
from tests.helpers import tiny_config


@pytest.mark.parametrize(
    "device,count,expected",
    [
        ("cpu", 0, ["cpu"] * 4),
        ("cpu", 2, ["cpu"] * 4),
        ("cuda", 1, ["cuda:0"] * 4),
        ("cuda", 2, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]),
        ("cuda", 4, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
        ("cuda", 8, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
        ("cuda:1", 2, ["cuda:1"] * 4),
    ],
)
def test_stage_i_goes_to_gpu_i_mod_n(device, count, expected):
    assert stage_devices(device, 4, count) == expected


@pytest.mark.parametrize("device,count", [("cuda", 0), ("cuda:2", 2)])
def test_a_gpu_the_host_lacks_is_refused_naming_what_it_has(device, count):
    with pytest.raises(DeviceError, match="cuda"):
        stage_devices(device, 4, count)


def test_the_engine_places_its_stages_by_stage_devices(tmp_path, monkeypatch):
    """The engine asks ``stage_devices`` with its config's device, its stage count and the GPUs it sees; with
    every stage on "cpu" it trains exactly like the engine did before per-stage devices."""
    cfg = tiny_config(tmp_path, "num_steps=3")
    trainer = Trainer(cfg)
    calls = []

    def fake_stage_devices(device, num_stages, count):
        calls.append((device, num_stages, count))
        return ["cpu"] * num_stages

    monkeypatch.setattr(pipeline, "cuda_count", lambda: 3)
    monkeypatch.setattr(pipeline, "stage_devices", fake_stage_devices)
    engine = PipelineEngine(
        build_stages(cfg.model, cfg.seed), trainer.schedule, trainer.batches, cfg.optim, device="cuda"
    )
    assert calls == [("cuda", 4, 3)]
    assert engine.devices == [torch.device("cpu")] * 4
    losses = []
    for step in range(3):
        losses.append(engine.run_step(step))
        assert engine.commit()
    trainer.run()
    expected = [r["loss/train"] for r in read_jsonl(trainer.run_dir / "metrics.jsonl")]
    assert losses == expected  # bit for bit: the trainer's own engine is built with device=cpu
    assert engine.evaluate(2) == trainer.engine.evaluate(2)


def test_the_trainer_refuses_cuda_on_a_host_without_it_saying_what_it_sees(tmp_path, monkeypatch):
    monkeypatch.setattr("checkfree.engine.trainer.cuda_count", lambda: 0)
    with pytest.raises(DeviceError, match="sees no CUDA device"):
        Trainer(tiny_config(tmp_path, "device=cuda"))
    monkeypatch.setattr("checkfree.engine.trainer.cuda_count", lambda: 2)
    with pytest.raises(DeviceError, match="2 visible CUDA device"):
        Trainer(tiny_config(tmp_path, "device=cuda:5"))


def test_a_rebuild_reads_its_sources_on_the_lost_stages_device():
    """Stages on different GPUs: the trainer moves the neighbours' blocks, Adam moments and edge replicas to the
    lost stage's device before averaging (the meta device stands in for a second GPU), Adam's step stays put."""
    import torch

    from checkfree.engine.recovery import _on

    blocks = {1: {"blocks.0.w": torch.ones(2)}, 3: {"blocks.0.w": torch.zeros(2)}}
    moments = {"blocks.0.w": {"exp_avg": torch.ones(2), "step": torch.tensor(5.0)}}
    replica = (7, {"embed.weight": torch.ones(3)})
    moved = _on({"b": blocks, "m": moments, "r": replica}, torch.device("meta"))
    assert moved["b"][1]["blocks.0.w"].device.type == "meta" and moved["r"][0] == 7
    assert moved["r"][1]["embed.weight"].device.type == "meta"
    assert moved["m"]["blocks.0.w"]["exp_avg"].device.type == "meta"
    assert moved["m"]["blocks.0.w"]["step"].device.type == "cpu"
