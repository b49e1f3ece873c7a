"""A peer's events, metrics and log copied to a place that outlives its VM (here fsspec's memory filesystem and
a local folder): what changed is copied every round and at the end, a failing copy is retried, and a URL no
filesystem can open is refused at start."""

import logging

import fsspec
import pytest

from checkfree.swarm.logsync import LOG_FILE, LogSync


def test_a_peers_files_and_log_are_copied_as_it_runs_and_when_it_ends(tmp_path):
    peer = tmp_path / "p"
    peer.mkdir()
    (peer / "events.jsonl").write_text('{"event": "peer_started"}\n')
    sync = LogSync("memory://logs/run1", peer, "s0.abc", every_s=3600)  # its thread copies once at start
    try:
        logging.getLogger("checkfree.test").warning("hello from the peer")
        sync.sync()
        assert sync.sync() == 0  # nothing changed since the last copy
        fs = fsspec.filesystem("memory")
        assert fs.cat("/logs/run1/peers/s0.abc/events.jsonl") == b'{"event": "peer_started"}\n'
        (peer / "metrics.jsonl").write_text('{"step": 0}\n')
        logging.getLogger("checkfree.test").warning("the last words")
    finally:
        sync.close()
    assert fs.cat("/logs/run1/peers/s0.abc/metrics.jsonl") == b'{"step": 0}\n'
    assert b"the last words" in fs.cat(f"/logs/run1/peers/s0.abc/{LOG_FILE}")


def test_a_failed_copy_is_retried_and_training_never_waits(tmp_path, monkeypatch):
    peer = tmp_path / "p"
    peer.mkdir()
    (peer / "events.jsonl").write_text("{}\n")
    dest = tmp_path / "bucket"
    sync = LogSync(str(dest), peer, "s1.def", every_s=3600)
    try:
        real = sync.fs.put_file

        def unreachable(*a, **k):
            raise OSError("bucket unreachable")

        monkeypatch.setattr(sync.fs, "put_file", unreachable)
        (peer / "events.jsonl").write_text("{}\n{}\n")  # a change to copy
        assert sync.sync() == 0 and sync.failures >= 1
        monkeypatch.setattr(sync.fs, "put_file", real)
        assert sync.sync() >= 1
        assert (dest / "peers" / "s1.def" / "events.jsonl").read_text() == "{}\n{}\n"
    finally:
        sync.close()


def test_a_url_no_filesystem_knows_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"swarm.log_url 'nosuch://x'"):
        LogSync("nosuch://x", tmp_path, "p.1", every_s=1)
