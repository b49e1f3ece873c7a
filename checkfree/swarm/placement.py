"""
Placement
=========

Where a peer runs and whether its stage fits there, settled before anything starts: its addresses (each on an
interface of this host, see ``addressing.on_this_host``), the device (``--device``,
else the config's ``device``, made concrete and checked against the GPUs this process sees, see
``checkfree.core.devices``), and the memory plan of its stage (of the largest stage for a spare, which may
take any), printed and checked against the device's free memory (CUDA) or the host's (CPU).
"""

from __future__ import annotations

import dataclasses
import logging

from checkfree.core.devices import check_device, cuda_count
from checkfree.core.memory_plan import MemoryPlan, check_fits, free_memory, plan_for
from checkfree.core.schedule import schedule_for
from checkfree.core.storage import open_storage
from checkfree.swarm.addressing import on_this_host

logger = logging.getLogger(__name__)


def place(cfg, device: str | None, stage: int | None):
    """(the config with this peer's concrete device, its memory plan).

    Raises:
        AddressError: an address on no interface. DeviceError: the device does not exist here.
        MemoryPlanError: the stage cannot fit. (All are ValueError.)
    """
    cfg = dataclasses.replace(
        cfg, device=check_device(device or cfg.device, cuda_count()), membership=on_this_host(cfg.membership)
    )
    if cfg.swarm.log_url:  # a URL no filesystem can open is refused now, before any process starts
        open_storage(cfg.swarm.log_url, cfg.swarm.log_storage_options, what="swarm.log_url")
    plan: MemoryPlan = plan_for(cfg, schedule_for(cfg.pipeline, cfg.model.num_stages, cfg.swap_enabled), stage)
    free, where = free_memory(cfg.device)
    logger.warning("memory plan on %s (%s free): %s", where, f"{free / 2**30:.1f} GiB", plan.describe())
    check_fits(plan, free, where)
    return cfg, plan
