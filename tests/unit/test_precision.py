"""Mixed precision (``precision=bf16``): a hop's forward under bf16 autocast, fp32 master weights, Adam,
norms, commit and rebuilds, activations and their gradients crossing stages in bf16, in both executors; and
``precision=fp32`` exactly as before precision existed (no autocast entered, no cast in the graph)."""

import math

import pytest
import torch
import torch.nn.functional as F

from checkfree.core import stage_step
from checkfree.core.data import Batches
from checkfree.core.metrics import read_jsonl
from checkfree.core.model import build_stages
from checkfree.core.schedule import schedule_for
from checkfree.core.stage_step import autocast, eval_hop, forward_hop, wire_dtype
from checkfree.engine.trainer import Trainer
from checkfree.swarm.transport import HEADER_LEN, PeerProtocolError
from checkfree.swarm.worker import StageWorker
from tests.helpers import run_ranks, tiny_config


def _old_forward_hop(stage, schedule, op, x, step, batches):
    """forward_hop as it was before precision existed (the fp32 reference)."""
    hop = schedule.routes[op.mb][op.hop]
    h = x
    if hop.embed:
        h = stage.run_embed(h)
    if hop.blocks:
        h = stage.run_blocks(h)
    if hop.head:
        logits = stage.run_head(h)
        h = F.cross_entropy(logits.flatten(0, 1), batches.targets(step, op.mb).flatten()) / schedule.num_microbatches
    return h


def _parts(cfg):
    """The schedule and batches a run of ``cfg`` uses."""
    schedule = schedule_for(cfg.pipeline, cfg.model.num_stages, cfg.swap_enabled)
    return schedule, Batches(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, cfg.seed)


def test_precision_names_its_wire_dtype_and_refuses_others():
    assert wire_dtype("fp32") == torch.float32 and wire_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        wire_dtype("fp16")
    assert isinstance(autocast("cpu", "bf16"), torch.autocast)


def test_fp32_hops_are_the_old_computation_bit_for_bit(tmp_path):
    """Every hop of a swapped 1F1B step, forward and backward: the same tensors, the same gradients, and no
    cast node in the graph (fp32 runs are what they were before precision existed)."""
    cfg = tiny_config(tmp_path)
    schedule, batches = _parts(cfg)
    new, old = build_stages(cfg.model, cfg.seed), build_stages(cfg.model, cfg.seed)
    for op in (op for op in schedule.timeline if op.kind == "F" and op.mb < 2):
        if op.src is None:
            x_new = x_old = batches.inputs(0, op.mb)
        else:
            x_new = torch.randn(4, cfg.model.seq_len, cfg.model.d_model, requires_grad=True)
            x_old = x_new.detach().clone().requires_grad_()
        a = forward_hop(new[op.stage], schedule, op, x_new, 0, batches, torch.device("cpu"))
        b = _old_forward_hop(old[op.stage], schedule, op, x_old, 0, batches)
        assert torch.equal(a, b) and a.dtype == torch.float32, op
        assert "ToCopy" not in type(a.grad_fn).__name__
        (a.sum() if a.dim() else a).backward()
        (b.sum() if b.dim() else b).backward()
        if op.src is not None:
            assert torch.equal(x_new.grad, x_old.grad)
    for s_new, s_old in zip(new, old):
        for (name, p), q in zip(s_new.named_parameters(), s_old.parameters()):
            assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name


def test_an_fp32_run_enters_no_autocast(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fp32 entered autocast")

    monkeypatch.setattr(stage_step.torch, "autocast", refuse)
    cfg = tiny_config(
        tmp_path, "num_steps=2", "eval_every_steps=1", "recovery.strategy=redundant", "pipeline.swap=false"
    )
    summary = Trainer(cfg).run()
    assert math.isfinite(summary["final_val_loss"])


def test_fp32_engine_losses_are_the_ones_recorded_before_precision(tmp_path):
    """Recorded on the tiny config before this change (byte-identical on the machine that recorded them);
    the tolerance only absorbs another CPU's float rounding."""
    cfg = tiny_config(tmp_path, "num_steps=6", "eval_every_steps=3")
    trainer = Trainer(cfg)
    trainer.run()
    rows = read_jsonl(trainer.run_dir / "metrics.jsonl")
    train = [r["loss/train"] for r in rows if "loss/train" in r]
    val = [r["loss/val"] for r in rows if r.get("loss/val") is not None]
    expected = [5.490430235862732, 5.336927175521851, 5.187580108642578, 5.11743688583374, 4.971778988838196]
    assert train == pytest.approx([*expected, 4.827777624130249], rel=1e-6)
    assert val == pytest.approx([4.979067087173462, 4.615749359130859], rel=1e-6)


def test_bf16_hop_autocasts_and_sends_bf16_while_weights_and_gradients_stay_fp32(tmp_path):
    cfg = tiny_config(tmp_path, "precision=bf16")
    schedule, batches = _parts(cfg)
    stages = build_stages(cfg.model, cfg.seed)
    first = next(op for op in schedule.timeline if op.kind == "F" and op.src is None)
    act = forward_hop(stages[first.stage], schedule, first, batches.inputs(0, first.mb), 0, batches, "cpu", "bf16")
    assert act.dtype == torch.bfloat16  # what crosses to the next stage
    received = act.detach().requires_grad_()  # as the next stage receives it
    op = next(o for o in schedule.timeline if o.kind == "F" and o.mb == first.mb and o.hop == first.hop + 1)
    out = forward_hop(stages[op.stage], schedule, op, received, 0, batches, "cpu", "bf16")
    out.float().sum().backward()
    assert received.grad.dtype == torch.bfloat16  # the gradient sent back travels in bf16 too
    act.backward(received.grad)
    for s in (stages[first.stage], stages[op.stage]):
        for name, p in s.named_parameters():
            assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32), name
    val = eval_hop(stages[0], batches.inputs(0, 0, split="val"), "cpu", "bf16")
    assert val.dtype == torch.bfloat16 and not val.requires_grad


def test_a_bf16_engine_run_keeps_master_weights_adam_and_rebuilds_in_fp32(tmp_path):
    """With failures and CheckFree+ rebuilds (neighbour averages, replica copies): parameters and Adam state
    stay fp32 throughout, the losses follow the fp32 run's closely, and the run learns."""
    common = ["num_steps=8", "eval_every_steps=4", "failures.mode=per_step", "failures.per_step_prob=0.15"]
    runs = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(tiny_config(tmp_path, *common, f"run_name={precision}", f"precision={precision}"))
        summary = trainer.run()
        runs[precision] = [r["loss/train"] for r in read_jsonl(trainer.run_dir / "metrics.jsonl") if "loss/train" in r]
        events = read_jsonl(trainer.run_dir / "events.jsonl")
    assert summary["recoveries"] > 0 and any(e["event"] == "rebuilt" for e in events)
    eng = trainer.engine
    assert {p.dtype for s in eng.stages for p in s.parameters()} == {torch.float32}
    moments = {v.dtype for o in eng.optimizers for st in o.state.values() for k, v in st.items() if k != "step"}
    assert moments == {torch.float32}
    assert all(math.isfinite(n) for n in eng.grad_norm_raw)
    assert runs["bf16"] == pytest.approx(runs["fp32"], abs=0.05)
    assert runs["bf16"][-1] < runs["bf16"][0]


def _workers(cfg, trainer, precision):
    stages = build_stages(cfg.model, cfg.seed)
    return [
        StageWorker(
            stages[i],
            trainer.schedule,
            trainer.batches,
            cfg.optim,
            cfg.optim.lr,
            cfg.model.d_model,
            precision=precision,
        )
        for i in range(cfg.model.num_stages)
    ]


def _train_on_ranks(workers, steps: int, num_val_batches: int):
    """Each worker on its thread rank: ``steps`` steps, then validation; the results per rank and the dtypes
    that went through the commit's all-reduce."""
    reduced = []

    def fn(group):
        w, all_reduce = workers[group.rank], group.all_reduce
        group.all_reduce = lambda t, step: (reduced.append(t.dtype), all_reduce(t, step))[1]
        losses = []
        for step in range(steps):
            w.run_step(group, step)
            losses.append(w.commit(group, step))
        return losses, w.bytes_sent, w.evaluate(group, num_val_batches, steps)

    results = run_ranks(len(workers), fn, timeout_s=10)
    assert not any(isinstance(r, Exception) for r in results), results
    return results, set(reduced)


def test_bf16_workers_reproduce_the_bf16_engine_and_send_half_the_bytes(tmp_path):
    """Thread ranks over real gloo groups: bf16 activations and gradients cross the wire, the losses, norms and
    weights are the bf16 engine's, the commit's all-reduce is float64, and a stage sends half fp32's payload."""
    steps, sent = 3, {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_config(tmp_path, f"num_steps={steps}", "eval_every_steps=3", f"run_name={precision}",
                          f"precision={precision}")  # fmt: skip
        reference = Trainer(cfg)
        reference.run()
        workers = _workers(cfg, reference, precision)
        results, reduced = _train_on_ranks(workers, steps, cfg.data.num_val_batches)
        rows = read_jsonl(reference.run_dir / "metrics.jsonl")
        expected = [r["loss/train"] for r in rows if "loss/train" in r]
        val = [r["loss/val"] for r in rows if r.get("loss/val") is not None][-1]
        for losses, _, got_val in results:
            assert losses == pytest.approx(expected, abs=1e-6) and got_val == pytest.approx(val, abs=1e-6)
        assert reduced == {torch.float64}
        for i, w in enumerate(workers):
            assert w.all_norms == pytest.approx(reference.engine.grad_norm_raw, rel=1e-5)
            for (k, a), b in zip(w.stage.state_dict().items(), reference.engine.stages[i].state_dict().values()):
                assert a.dtype == torch.float32 and (a - b).abs().max().item() < 1e-5, k
        sent[precision] = [r[1] for r in results]
    schedule = schedule_for(cfg.pipeline, 4, cfg.swap_enabled)
    act = cfg.data.microbatch_size * cfg.model.seq_len * cfg.model.d_model  # elements of one (B, T, C) message
    for s in range(4):
        messages = sum(op.dst is not None for op in schedule.ops[s])  # activations forward, gradients back
        assert sent["fp32"][s] == messages * (HEADER_LEN * 8 + act * 4)
        assert sent["bf16"][s] == messages * (HEADER_LEN * 8 + act * 2)


def test_a_receiver_expecting_fp32_refuses_a_bf16_activation():
    import threading

    read = threading.Event()  # the sender keeps its group (and connections) until the header was read

    def fn(group):
        if group.rank == 0:
            group.send(torch.ones(2, 3, dtype=torch.bfloat16), 1, 0, 0, 1, "act")
            read.wait(10)
            return None  # the refused payload is never received: waiting for it would only time out
        try:
            return group.recv(0, 0, 0, 1, "act", (2, 3))
        finally:
            read.set()

    results = run_ranks(2, fn, timeout_s=1)
    assert isinstance(results[1], PeerProtocolError) and "torch.bfloat16" in str(results[1]), results
