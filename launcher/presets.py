"""
Launch presets
==============

Override lists that the soak, the multi-host scenario and the tests start peers with, kept in one place so a
script never imports another script and the tests' toy model is the scripts' toy model.

``TINY`` is a toy model whose step takes milliseconds on a CPU; ``SWARM_2CORE`` the swarm timings that keep
four peers and their spares responsive on a 2-core machine (short heartbeats, one thread per peer, no
progress bar, no plot, one validation at the end).
"""

from __future__ import annotations

TINY: list[str] = [
    "model.d_model=32",
    "model.num_heads=2",
    "model.num_layers=4",
    "model.num_stages=4",
    "model.seq_len=32",
    "data.max_bytes=400000",
    "data.microbatch_size=4",
    "data.num_val_batches=2",
    "pipeline.num_microbatches=4",
    "optim.lr=3e-3",
]
SWARM_2CORE: list[str] = [
    "num_threads=1",
    "membership.period_s=0.25",
    "membership.ttl_s=1.5",
    "transport.timeout_s=5",
    "swarm.spare_delay_s=1",
    "eval_every_steps=0",  # validation once, at the end
    "progress=false",
    "plot=false",
]
