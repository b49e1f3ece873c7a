"""
Seeding
=======

Every random draw of a run (weight init, batches, failure traces, re-initialisation of a lost stage) is
seeded from integers through ``hash_seed``, so that any process, in either executor, draws the same
numbers for the same (seed, what, where) without talking to anyone.
"""

from __future__ import annotations

import hashlib


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers: stable across processes and platforms (unlike ``hash``), and with no
    structure between nearby inputs. (A boost-style linear mix used before made seed s+1 at iteration i
    collide with seed s at iteration i+65: "different" seeds replayed shifted copies of one failure trace.)"""
    data = b"".join(int(p).to_bytes(8, "little", signed=True) for p in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & 0x7FFFFFFFFFFFFFFF


def reinit_salt(step: int) -> int:
    """The ``init_stage_`` salt of a stage rebuilt at ``step`` (salt 0 is the run's initial weights).

    A pure function of the step, so the engine and every swarm peer draw the same fresh weights for the
    same loss (the embedding or head of an edge stage whose replica is gone, or a ``random`` rebuild).
    """
    return 1 + step
