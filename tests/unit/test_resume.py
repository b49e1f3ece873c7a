"""Resume in the engine, in process: a run saved at a step and continued by a new Trainer gives the losses of
the run that was never interrupted, for every strategy (edge replicas, shadows, rollbacks and the fired
failures included); a resume from checkpoint.dir on a machine without the run directory; and the refusals:
another config, resume=never, a run that saved nothing, overwrite=true saying what it deletes, an
unwritable run directory."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from checkfree.engine.trainer import RunDirError, Trainer
from tests.helpers import tiny_config

FAILS = ["failures.mode=per_step", "failures.per_step_prob=0.06"]


def _losses(trainer: Trainer) -> list[float]:
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss/train"] for line in lines]


@pytest.mark.parametrize(
    "strategy",
    ["checkfree_plus", "checkfree", "checkpoint", "hybrid", "redundant", "random"],
)
def test_a_resumed_run_repeats_the_uninterrupted_losses(tmp_path, strategy):
    args = [f"recovery.strategy={strategy}", "checkpoint.every_steps=4", *FAILS]
    if strategy == "redundant":
        args.append("pipeline.swap=false")
    whole = Trainer(tiny_config(tmp_path, *args, "num_steps=20", "run_name=whole"))
    whole.run()
    first = Trainer(tiny_config(tmp_path, *args, "num_steps=13", "run_name=cut"))
    first.run()  # ends with a save at 13, as a killed run would have one at 12
    rest = Trainer(tiny_config(tmp_path, *args, "num_steps=20", "run_name=cut"))
    assert rest.resumed_from == 13
    summary = rest.run()
    assert _losses(rest) == _losses(whole)
    assert whole.state.failures >= 1 and summary["failures"] == whole.state.failures
    assert [(f.iteration, f.stage) for f in rest.injector.fired] == [
        (f.iteration, f.stage) for f in whole.injector.fired
    ]


def test_a_new_machine_resumes_from_checkpoint_dir(tmp_path):
    """The run directory is gone (a new spot VM) but the checkpoints are on shared storage."""
    store = tmp_path / "bucket"
    args = ["checkpoint.every_steps=5", f"checkpoint.dir={store}"]
    Trainer(tiny_config(tmp_path / "vm1", *args, "num_steps=10")).run()
    t = Trainer(tiny_config(tmp_path / "vm2", *args, "num_steps=15"))
    assert t.resumed_from == 10
    assert t.run()["steps"] == 15


def test_refusals_name_what_is_wrong(tmp_path, caplog):
    Trainer(tiny_config(tmp_path, "num_steps=4", "checkpoint.every_steps=2")).run()
    with pytest.raises(RunDirError, match=r"model.d_model: saved 32, now 64"):
        Trainer(tiny_config(tmp_path, "num_steps=6", "model.d_model=64"))
    with pytest.raises(RunDirError, match="resume=never"):
        Trainer(tiny_config(tmp_path, "num_steps=4", "resume=never"))
    with pytest.raises(RunDirError, match=r"already reached step 4 \(num_steps=4\): raise num_steps"):
        Trainer(tiny_config(tmp_path, "num_steps=4"))
    with caplog.at_level(logging.WARNING):
        t = Trainer(tiny_config(tmp_path, "num_steps=4", "overwrite=true"))
    assert t.resumed_from is None and "deleting the run directory" in caplog.text and "[2, 4]" in caplog.text
    (t.run_dir / "summary.json").write_text("{}")  # a run that saved nothing yet (killed before its end)
    with pytest.raises(RunDirError, match="no saved state to resume from.*checkpoint.every_steps"):
        Trainer(tiny_config(tmp_path, "num_steps=4"))


def test_overwrite_clears_an_external_checkpoint_dir_and_says_so(tmp_path, caplog):
    store = tmp_path / "shared"
    args = ["num_steps=4", "checkpoint.every_steps=2", f"checkpoint.dir={store}"]
    Trainer(tiny_config(tmp_path, *args)).run()
    with caplog.at_level(logging.WARNING):
        t = Trainer(tiny_config(tmp_path, *args, "overwrite=true"))
    assert t.resumed_from is None and f"the saved steps [2, 4] in {store}" in caplog.text
    assert not list(store.glob("step_*"))


def test_an_unwritable_run_directory_is_refused_by_name(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match="cannot write the run directory"):
        Trainer(tiny_config(tmp_path, f"out_dir={tmp_path / 'file'}"))


def test_a_stop_saves_at_the_step_boundary_and_the_run_resumes_there(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "num_steps=10", *FAILS))

    def stop_at_six(state):
        if state.step == 6:
            trainer.request_stop("SIGINT")

    summary = trainer.run(on_step=stop_at_six)
    assert summary["stopped"] == "SIGINT" and summary["steps"] == 6
    assert (trainer.run_dir / "model.safetensors").exists()
    rest = Trainer(tiny_config(tmp_path, "num_steps=10", *FAILS))
    assert rest.resumed_from == 6 and rest.run()["steps"] == 10
    whole = Trainer(tiny_config(tmp_path, "num_steps=10", *FAILS, "run_name=whole"))
    whole.run()
    assert _losses(rest) == _losses(whole)


def test_a_failed_periodic_save_is_an_event_and_training_goes_on(tmp_path, monkeypatch, caplog):
    from checkfree.core.checkpoint import CheckpointStore

    save_extra = CheckpointStore.save_extra

    def broken(self, step, name, data):
        if step > 0:  # the save at the start works; the disk is full from step 3 on
            raise OSError(28, "No space left on device")
        save_extra(self, step, name, data)

    monkeypatch.setattr(CheckpointStore, "save_extra", broken)
    t = Trainer(tiny_config(tmp_path, "num_steps=6", "checkpoint.every_steps=3", "recovery.strategy=checkfree"))
    with caplog.at_level(logging.WARNING):
        summary = t.run()  # the end's save fails too: a warning, after the weights were written
    assert summary["steps"] == 6 and (t.run_dir / "model.safetensors").exists()
    assert "its end could not be saved" in caplog.text
    events = [json.loads(line)["event"] for line in (t.run_dir / "events.jsonl").read_text().splitlines()]
    assert "checkpoint_failed" in events


def test_a_resume_drops_what_a_killed_run_wrote_after_the_saved_step(tmp_path):
    """Stage files of a later step without its resume state (killed between the two) must not become a rollback
    target, and the events and metrics after the saved step are cut back."""
    args = ["checkpoint.every_steps=2", "recovery.strategy=checkpoint", *FAILS]
    first = Trainer(tiny_config(tmp_path, *args, "num_steps=6"))
    first.run()
    ckpt = first.run_dir / "checkpoints"
    (ckpt / "step_00000006" / "engine.pt").unlink()  # as if killed after the stages' files of step 6
    shutil.rmtree(ckpt / "resume", ignore_errors=True)
    rest = Trainer(tiny_config(tmp_path, *args, "num_steps=8"))
    assert rest.resumed_from == 4 and not (ckpt / "step_00000006").exists()
    events = [json.loads(line) for line in (rest.run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "checkpoint_save" and events[-1]["step"] == 4
    assert max(json.loads(line)["step"] for line in (rest.run_dir / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_run_directory_that_is_a_file_is_refused_by_name(tmp_path):
    (tmp_path / "tiny").write_text("")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        Trainer(tiny_config(tmp_path, "run_name=tiny"))


def test_a_refused_run_directory_is_left_as_it_was(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError):
        Trainer(tiny_config(tmp_path, "run_name=tiny"))
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == ["notes.txt"]
