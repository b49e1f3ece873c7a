"""Which device each stage and each peer gets, from the config and the GPUs this process sees; a GPU that does
not exist is refused naming what the host has. (Tested with a given device count; on a GPU machine the same
functions read torch's.)"""

import pytest

from checkfree.core.devices import DeviceError, check_device, peer_device, stage_devices


def test_a_swarm_on_a_host_with_n_gpus_puts_peer_k_on_gpu_k_mod_n():
    assert [peer_device("cuda", [], k, 4) for k in range(6)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:3",
        "cuda:0",
        "cuda:1",
    ]
    assert [peer_device("cpu", [], k, 4) for k in range(3)] == ["cpu"] * 3
    assert [peer_device("cuda", ["cuda:1", "cuda:3"], k, 4) for k in range(3)] == ["cuda:1", "cuda:3", "cuda:1"]


def test_the_engine_places_stage_i_on_gpu_i_mod_n_or_all_on_one():
    assert stage_devices("cuda", 4, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert stage_devices("cuda:1", 3, 2) == ["cuda:1"] * 3
    assert stage_devices("cpu", 2, 0) == ["cpu", "cpu"]


def test_a_peer_given_cuda_takes_the_first_visible_gpu(monkeypatch):
    assert check_device("cuda", 1) == "cuda:0"  # the launcher narrows CUDA_VISIBLE_DEVICES, or passes cuda:K
    assert check_device("cuda:2", 3) == "cuda:2"


def test_a_gpu_that_does_not_exist_is_refused_naming_what_the_host_has(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(
        DeviceError, match=r"cuda:2.* does not exist: this host has 2 visible .*=0,1\), expected cuda:0..cuda:1"
    ):
        check_device("cuda:2", 2)
    with pytest.raises(DeviceError, match=r"torch sees no CUDA device .*use device=cpu"):
        peer_device("cuda", [], 0, 0)
    with pytest.raises(DeviceError, match=r"cuda:5"):
        peer_device("cpu", ["cuda:5"], 0, 2)
    with pytest.raises(DeviceError, match=r"expected cuda:N"):
        check_device("cuda:x", 2)


def test_a_first_roster_that_would_put_two_nccl_ranks_on_one_gpu_is_refused():
    from checkfree.core.devices import check_nccl_roster

    check_nccl_roster(["cuda:0", "cuda:1", "cuda:2", "cuda:3"], "nccl")
    check_nccl_roster(["cpu"] * 4, "gloo")
    layout = [peer_device("cuda", [], k, 2) for k in range(4)]
    with pytest.raises(DeviceError, match=r"two stages of one group on one GPU.*at least 4 GPUs"):
        check_nccl_roster(layout, "nccl")
