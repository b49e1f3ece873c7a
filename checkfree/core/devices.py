"""
Devices
=======

Which device each stage runs on, as pure functions of the config and the number of GPUs this process sees
(``torch.cuda.device_count()``, which honours ``CUDA_VISIBLE_DEVICES``: index 0 is the first *visible* GPU).

- The engine (one process, every stage): ``device=cuda`` places stage i on GPU ``i mod N``; ``cuda:K`` puts
  every stage on GPU K.
- A swarm peer: one device. ``device=cuda`` is the first visible GPU (a launcher that narrows
  ``CUDA_VISIBLE_DEVICES`` per peer, or passes ``--device cuda:K``, picks which); ``cuda:K`` is GPU K.
- The local launcher (``checkfree swarm``): peer k gets ``swarm.devices[k mod len]``; without that list,
  ``device=cuda`` spreads its peers over every visible GPU (peer k on ``cuda:k mod N``).

A GPU that does not exist is refused, naming what was asked and what this host has; so is a swarm whose first
roster would put two NCCL ranks on one GPU (``check_nccl_roster``).
"""

from __future__ import annotations

import os


class DeviceError(ValueError):
    """A device that this host does not have (the message names it and the ones it has)."""


def _visible() -> str:
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else ""


def check_device(device: str, count: int) -> str:
    """``device`` made concrete for one process (``cuda`` -> ``cuda:0``), or ``DeviceError``.

    ``count``: the number of CUDA devices this process sees."""
    if device == "cpu":
        return device
    if not (device == "cuda" or device.startswith("cuda:")):
        raise DeviceError(f"device={device!r} must be cpu, cuda or cuda:N")
    if count == 0:
        raise DeviceError(f"device={device!r} but torch sees no CUDA device{_visible()}; use device=cpu")
    index_text = device.partition(":")[2] or "0"
    if not index_text.isdigit():
        raise DeviceError(f"device={device!r}: expected cuda:N with N a GPU index")
    index = int(index_text)
    if index >= count:
        raise DeviceError(
            f"device={device!r} does not exist: this host has {count} visible CUDA device(s){_visible()}, "
            f"expected cuda:0..cuda:{count - 1}"
        )
    return f"cuda:{index}"


def stage_devices(device: str, num_stages: int, count: int) -> list[str]:
    """The engine's device for each stage: with ``device=cuda``, stage i on GPU ``i mod count``."""
    if device == "cuda" and count > 0:
        return [f"cuda:{i % count}" for i in range(num_stages)]
    return [check_device(device, count)] * num_stages


def peer_device(device: str, devices: list[str], k: int, count: int) -> str:
    """The device the local launcher gives the k-th peer it starts (0-based, spares included)."""
    if devices:
        return check_device(devices[k % len(devices)], count)
    if device == "cuda" and count > 0:
        return f"cuda:{k % count}"
    return check_device(device, count)


def cuda_count() -> int:
    """The CUDA devices this process sees (0 without a CUDA build of torch)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_nccl_roster(devices: list[str], backend: str) -> None:
    """NCCL cannot hold two ranks of one group on one GPU: refuse a first roster (the devices of the first
    ``num_stages`` peers) that would need it. Spares get GPUs in turn too: give every peer its own GPU (as many
    as stages plus spares) or a spare that takes a stage may share a GPU with a member and its epoch fail."""
    if backend != "nccl":
        return
    shared = sorted({d for d in devices if devices.count(d) > 1})
    if shared:
        raise DeviceError(
            f"NCCL cannot put two stages of one group on one GPU, and the first {len(devices)} peers would get "
            f"{devices} ({', '.join(shared)} twice): use a host with at least {len(devices)} GPUs, or "
            f"swarm.devices naming {len(devices)} different ones"
        )
