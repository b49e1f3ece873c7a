import pytest
import torch

from checkfree.config import TrainConfig, load_config

TINY = [
    "model.d_model=32", "model.num_heads=2", "model.num_layers=4", "model.num_stages=4", "model.seq_len=32",
    "data.max_bytes=400000", "data.microbatch_size=4", "data.num_val_batches=2", "pipeline.num_microbatches=4",
    "optim.lr=3e-3", "progress=false", "plot=false", "eval_every_steps=0",
]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tiny_config(tmp_path, *overrides: str) -> TrainConfig:
    """A model small enough that a step takes milliseconds on one core, failures off by default."""
    return load_config([], [*TINY, "failures.mode=none", f"out_dir={tmp_path}", *overrides])
