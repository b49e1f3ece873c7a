"""A checkpoint is restored only when it is sound: finite weights and optimizer state, and an lr in the config's
range; a planted or diverged file is refused by its path, the key and what was expected."""

import math

import pytest
import torch

from checkfree.core.checkpoint import (
    CheckpointRejected,
    CheckpointStore,
    StagePayload,
    max_restored_lr,
    payload_bytes,
    payload_from_bytes,
)
from checkfree.core.recovery import RecoveryConfig
from checkfree.core.stage_step import OptimConfig

LR = 1e-3


def _payload(stage: int = 0, step: int = 4, lr: float = LR) -> StagePayload:
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=LR)
    p.sum().backward()
    opt.step()
    model = {"blocks.0.w": p.detach().clone(), "blocks.0.mask": torch.ones(3, dtype=torch.bool)}
    return StagePayload(stage, step, model, opt.state_dict(), lr, 1.0, None)


def _planted(tmp_path, payload: StagePayload) -> tuple[CheckpointStore, str]:
    """A store holding ``payload`` as the file of its stage and step, and that file's path."""
    store = CheckpointStore(tmp_path, num_stages=1)
    store.save_stage(payload)
    return store, str(tmp_path / f"step_{payload.step:08d}" / f"stage_{payload.stage}.pt")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_planted_non_finite_weight_is_refused_naming_the_file_and_the_tensor(tmp_path, bad):
    payload = _payload()
    payload.model["blocks.0.w"][1] = bad
    store, path = _planted(tmp_path, payload)
    with pytest.raises(CheckpointRejected, match=rf"checkpoint {path}: model 'blocks.0.w' holds 1 NaN/inf of 3"):
        store.load_stage(4, 0)
    with pytest.raises(RuntimeError, match="expected finite weights"):  # what callers that stop on a load catch
        store.load_stage(4, 0, max_lr=1.0)


def test_a_non_finite_optimizer_state_is_refused_naming_its_key(tmp_path):
    payload = _payload()
    payload.optim["state"][0]["exp_avg_sq"][2] = math.nan
    store, path = _planted(tmp_path, payload)
    with pytest.raises(ValueError, match=rf"{path}: optim 'state.0.exp_avg_sq' holds 1 NaN/inf .*optimizer state"):
        store.load_stage(4, 0)
    payload = _payload()
    payload.optim["param_groups"][0]["eps"] = math.inf  # a plain value of the state, not only its tensors
    with pytest.raises(CheckpointRejected, match=r"optim 'param_groups.0.eps' holds inf"):
        payload_from_bytes(payload_bytes(payload), "the hand-over from p.1234")


def test_an_lr_out_of_the_configs_range_is_refused_naming_the_file(tmp_path):
    optim, recovery = OptimConfig(lr=LR), RecoveryConfig()
    bound = max_restored_lr(optim.lr, recovery.lr_factor)
    store, path = _planted(tmp_path, _payload(lr=1e30))
    with pytest.raises(CheckpointRejected, match=rf"checkpoint {path}: lr=1e\+30, expected 0 < lr <= 0.0011"):
        store.load_stage(4, 0, max_lr=bound)
    for lr in (math.nan, math.inf, 0.0, -LR):  # refused with or without a bound
        store, path = _planted(tmp_path / str(lr), _payload(lr=lr))
        with pytest.raises(CheckpointRejected, match=f"{path}: lr=.*expected a finite lr > 0"):
            store.load_stage(4, 0)


def test_the_lrs_a_run_saves_are_restored(tmp_path):
    """The configured lr, and a rebuilt stage's lr * lr_factor, are within the bound."""
    optim, recovery = OptimConfig(lr=LR), RecoveryConfig(lr_factor=1.1)
    bound = max_restored_lr(optim.lr, recovery.lr_factor)
    for i, lr in enumerate((optim.lr, optim.lr * recovery.lr_factor)):
        store, _ = _planted(tmp_path / str(i), _payload(lr=lr))
        assert store.load_stage(4, 0, max_lr=bound).lr == lr
    assert max_restored_lr(LR, 0.5) == pytest.approx(LR, rel=2e-4)  # a factor below 1 never lowers the bound
