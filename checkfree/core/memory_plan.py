"""
Memory plan
===========

What one stage needs in memory, worked out from the config before anything is allocated, so that a peer can
say it and refuse a config that cannot fit instead of dying of an out-of-memory error in its first step.

- **weights**, **gradients** and **Adam** (two moments): fp32, whatever ``precision`` (bf16 keeps fp32 masters);
- **activations**: what autograd keeps per microbatch and hop, times the microbatches in flight on this stage
  under the schedule (GPipe keeps every microbatch's; 1F1B at most the pipeline's depth). Per block, in
  elements: ``10 B T C + 4 B T F + 2 B H T^2`` (norms, projections, RoPE, the attention matrix and the
  SwiGLU), and ``2 B T V`` for the logits of the head; 4 bytes each in fp32, 2 in bf16. It is an estimate:
  tests/unit/test_memory_plan.py checks it against what autograd really saves, within a factor of 1.5;
- **edge replica**: the copy of the embedding (stage 1) or of the head (stage L-2) that CheckFree+ keeps;
- **shadow**: under ``recovery.strategy=redundant``, the next stage's weights, gradients, Adam and
  activations.

The totals exclude the framework's own overhead (the CUDA context, allocator slack, the DHT's process):
``check_fits`` keeps ``HEADROOM`` of what is free for those.
"""

from __future__ import annotations

from dataclasses import dataclass

from checkfree.core.model import ModelConfig
from checkfree.core.schedule import Schedule

HEADROOM = 0.10  # share of the free memory left to the framework, the allocator and the rest of the process
FP32 = 4


class MemoryPlanError(ValueError):
    """A config whose stage cannot fit in the memory this peer has (the message names the numbers)."""


@dataclass(frozen=True)
class MemoryPlan:
    stage: int
    weights: int
    gradients: int
    adam: int
    activations: int  # for every microbatch in flight
    in_flight: int  # hops whose activations this stage holds at once
    edge_replica: int
    shadow: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.adam + self.activations + self.edge_replica + self.shadow

    def describe(self) -> str:
        parts = [
            f"weights {_mib(self.weights)}",
            f"gradients {_mib(self.gradients)}",
            f"Adam {_mib(self.adam)}",
            f"activations {_mib(self.activations)} ({self.in_flight} hops in flight)",
        ]
        if self.edge_replica:
            parts.append(f"edge replica {_mib(self.edge_replica)}")
        if self.shadow:
            parts.append(f"shadow {_mib(self.shadow)}")
        return f"stage {self.stage}: {_mib(self.total)} = " + ", ".join(parts)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def block_params(m: ModelConfig) -> int:
    C, F = m.d_model, m.ffn_hidden or 4 * m.d_model
    return 4 * C * C + 3 * C * F + 2 * C  # attention q, k, v, o; SwiGLU gate, up, down; two RMSNorms


def stage_params(m: ModelConfig, stage: int) -> int:
    per_stage = m.num_layers // m.num_stages
    n = per_stage * block_params(m)
    if stage == 0:
        n += m.vocab_size * m.d_model  # embedding
    if stage == m.num_stages - 1:
        n += m.vocab_size * m.d_model + m.d_model  # head and its norm
    return n


def hop_activation_elements(m: ModelConfig, microbatch_size: int, blocks: bool, head: bool) -> int:
    """What autograd keeps for one hop of one microbatch, in elements (see the module's docstring)."""
    B, T, C, H = microbatch_size, m.seq_len, m.d_model, m.num_heads
    F = m.ffn_hidden or 4 * C
    n = 0
    if blocks:
        n += (m.num_layers // m.num_stages) * (10 * B * T * C + 4 * B * T * F + 2 * B * H * T * T)
    if head:
        n += 2 * B * T * m.vocab_size + 2 * B * T * C
    return n


def in_flight(schedule: Schedule, stage: int) -> int:
    """The most forward hops on ``stage`` whose backward has not run yet, over the schedule's order."""
    held = most = 0
    for op in schedule.ops[stage]:
        held += 1 if op.kind == "F" else -1
        most = max(most, held)
    return most


def plan_stage(
    m: ModelConfig, schedule: Schedule, stage: int, microbatch_size: int, precision: str, strategy: str, replicas: bool
) -> MemoryPlan:
    """The memory plan of ``stage`` (see the module's docstring)."""
    act_bytes = 2 if precision == "bf16" else FP32
    last = m.num_stages - 1

    def activations(s: int) -> tuple[int, int]:
        hops = [schedule.routes[op.mb][op.hop] for op in schedule.ops[s] if op.kind == "F"]
        per_hop = max((hop_activation_elements(m, microbatch_size, bool(h.blocks), h.head) for h in hops), default=0)
        k = in_flight(schedule, s)
        return k * per_hop * act_bytes, k

    params = stage_params(m, stage)
    acts, k = activations(stage)
    edge = 0
    if replicas and m.num_stages > 2:
        if stage == 1:
            edge += m.vocab_size * m.d_model * FP32
        if stage == last - 1:
            edge += (m.vocab_size * m.d_model + m.d_model) * FP32
    shadow = 0
    if strategy == "redundant":
        nxt = (stage + 1) % m.num_stages
        shadow = 4 * stage_params(m, nxt) * FP32 + activations(nxt)[0]
    return MemoryPlan(stage, params * FP32, params * FP32, 2 * params * FP32, acts, k, edge, shadow)


def plan_for(cfg, schedule: Schedule, stage: int | None) -> MemoryPlan:
    """The plan of ``stage``, or of the largest stage when it is not known yet (a spare may take any)."""
    from checkfree.core.recovery import edge_replicas_on

    def one(s: int) -> MemoryPlan:
        return plan_stage(
            cfg.model,
            schedule,
            s,
            cfg.data.microbatch_size,
            cfg.precision,
            cfg.recovery.strategy,
            edge_replicas_on(cfg.recovery),
        )

    if stage is not None:
        return one(stage)
    return max((one(s) for s in range(cfg.model.num_stages)), key=lambda p: p.total)


def check_fits(plan: MemoryPlan, free_bytes: int, where: str) -> None:
    """Raise ``MemoryPlanError`` naming the numbers when ``plan`` needs more than ``free_bytes`` less the
    headroom (``where``: the device or host the free memory was read from)."""
    usable = int(free_bytes * (1 - HEADROOM))
    if plan.total > usable:
        raise MemoryPlanError(
            f"this config cannot fit: {plan.describe()}, but {where} has {_mib(free_bytes)} free "
            f"({_mib(usable)} usable after {HEADROOM:.0%} headroom); use a smaller model.d_model, "
            f"data.microbatch_size or model.seq_len, more stages, precision=bf16, or a larger device"
        )


def free_memory(device: str) -> tuple[int, str]:
    """(free bytes, where) for ``device``: the GPU's free memory, or the host's available memory."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free, device
    import psutil

    return psutil.virtual_memory().available, "this host"
