"""The CUDA path: the engine on a GPU in bf16, and NCCL epoch groups (thread ranks, one GPU each) that carry
messages and whose abort releases a wait on a frozen peer. Marked ``gpu``: skipped where torch sees no GPU
(here, and in CI); run them on a GPU machine with ``python -m pytest -m gpu tests/integration/test_cuda.py``,
beside ``scripts/gpu_check.py``."""

import threading
import time
from datetime import timedelta

import pytest
import torch

from checkfree.core.devices import cuda_count

GPUS = cuda_count()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="torch sees no CUDA device")]


def test_the_engine_trains_on_a_gpu_in_bf16(tmp_path):
    from checkfree.engine.trainer import Trainer
    from tests.helpers import tiny_config

    cfg = tiny_config(tmp_path, "device=cuda", "precision=bf16", "num_steps=5", "failures.mode=none")
    result = Trainer(cfg).run()
    assert result.last_val_loss is not None and result.last_val_loss == result.last_val_loss


@pytest.mark.skipif(GPUS < 2, reason="NCCL needs one GPU per rank: two ranks need two GPUs")
def test_a_nccl_group_carries_messages_and_its_abort_releases_a_wait():
    import torch.distributed as dist

    from checkfree.swarm.config import TransportConfig
    from checkfree.swarm.transport import EpochGroup, StageLostError

    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    out: list = [None, None]
    frozen = threading.Event()

    def rank(r):
        try:
            client = dist.TCPStore("127.0.0.1", store.port, 2, is_master=False, timeout=timedelta(seconds=30))
            g = EpochGroup(client, 0, r, [0, 1], TransportConfig(timeout_s=20), run_tag=7, device=f"cuda:{r}")
            if r == 0:
                g.send(torch.ones(4, device="cuda:0"), 1, step=1, mb=0, hop=1, kind="act")
                frozen.wait(30)  # then sends nothing more: a frozen peer
                out[0] = "ok"
            else:
                got = g.recv(0, step=1, mb=0, hop=1, kind="act", shape=(4,))
                threading.Timer(0.5, lambda: g.abort("stage 0's heartbeat expired")).start()
                t0 = time.monotonic()
                try:
                    g.recv(0, step=2, mb=0, hop=1, kind="act", shape=(4,))
                except StageLostError as e:
                    out[1] = (got.sum().item(), time.monotonic() - t0, str(e))
                finally:
                    frozen.set()
        except Exception as e:  # reported below
            out[r] = e
            frozen.set()

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out[0] == "ok", out
    total, waited, why = out[1]
    assert total == 4.0 and waited < 5.0 and "heartbeat expired" in why, out
