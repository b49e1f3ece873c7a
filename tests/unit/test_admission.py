"""The seal every node checks before it stores or returns a record: size bound, token and signer; the token
file, created and read only as its owner's alone; the secrets taken out of the environment once read."""

import os
import stat

import pytest

import checkfree.swarm.admission as admission_mod
from checkfree.swarm.admission import (
    KEY_ENV,
    MAX_SEALED_BYTES,
    SWARM_ENV,
    SWARM_FILE,
    TOKEN_ENV,
    TOKEN_FILE,
    Admission,
    AdmissionError,
    ForeignToken,
    Identity,
    dht_context,
    find_swarm_id,
    find_token,
    new_swarm_id,
    new_token,
    scrub_secrets,
    write_swarm_id,
    write_token,
)
from checkfree.swarm.peer import admission_for
from tests.helpers import admission


def test_a_sealed_record_over_the_size_bound_is_refused_by_every_node():
    writer, node = admission("writer"), admission("node")
    context = dht_context(b"run/members", b"writer", 123.0)
    signer, body = node.open(context, writer.seal(context, b"small"))
    assert (signer, body) == (writer.peer_id, b"small")
    big = writer.seal(context, b"y" * (MAX_SEALED_BYTES + 1))
    with pytest.raises(ValueError, match=f"at most {MAX_SEALED_BYTES} bytes"):
        node.open(context, big)


def test_a_record_sealed_with_another_token_or_for_another_key_is_refused():
    writer, node = admission("writer"), admission("node")
    context = dht_context(b"run/members", b"writer", 123.0)
    blob = writer.seal(context, b"body")
    with pytest.raises(ValueError, match="join token"):
        node.open(dht_context(b"run/members", b"writer", 124.0), blob)  # replayed under another expiration
    stranger = admission("stranger", token=new_token())
    with pytest.raises(ValueError, match="join token"):
        node.open(context, stranger.seal(context, b"body"))


def test_a_record_of_another_swarm_with_the_same_token_is_refused():
    """Two runs with one token (an exported $CHECKFREE_JOIN_TOKEN, a restart in the same run directory) are
    two swarms: a record sealed in one, captured and replayed into the other, is refused there."""
    token = new_token()
    one, other = new_swarm_id(), new_swarm_id()
    assert one != other
    writer, node = Admission(token, Identity("writer"), one), Admission(token, Identity("node"), one)
    context = dht_context(b"run/epoch", b"", 123.0)
    assert node.open(context, writer.seal(context, b"stop"))[1] == b"stop"
    elsewhere = Admission(token, Identity("node"), other)
    with pytest.raises(ForeignToken, match="join token and id"):
        elsewhere.open(context, writer.seal(context, b"stop"))
    with pytest.raises(ForeignToken):  # nor does a record without a swarm id pass
        node.open(context, Admission(token, Identity("old")).seal(context, b"stop"))


def test_a_peer_that_starts_a_swarm_draws_a_new_id_and_a_joiner_must_be_given_it(tmp_path, monkeypatch):
    monkeypatch.delenv(SWARM_ENV, raising=False)
    monkeypatch.setenv(TOKEN_ENV, new_token())
    first, _ = admission_for(tmp_path, None, [], "first")
    again, _ = admission_for(tmp_path, None, [], "first")  # a restart starts another swarm: another id
    assert first.swarm_id != again.swarm_id
    assert (tmp_path / SWARM_FILE).read_text().strip() == again.swarm_id
    monkeypatch.setenv(TOKEN_ENV, new_token())
    joiner, _ = admission_for(tmp_path, None, ["/ip4/127.0.0.1/tcp/1"], "joiner")  # from the run directory
    assert joiner.swarm_id == again.swarm_id
    monkeypatch.setenv(TOKEN_ENV, new_token())
    with pytest.raises(AdmissionError, match=r"needs its swarm id: pass --swarm-id or set \$CHECKFREE_SWARM_ID"):
        admission_for(tmp_path / "elsewhere", None, ["/ip4/127.0.0.1/tcp/1"], "joiner")


def test_a_malformed_swarm_id_is_named_with_where_it_came_from(tmp_path, monkeypatch):
    monkeypatch.setenv(SWARM_ENV, "not-an-id")
    with pytest.raises(AdmissionError, match=r"swarm id 'not-an-id' is not valid: expected 32 .*\$CHECKFREE_SWARM_ID"):
        find_swarm_id(None, tmp_path)
    monkeypatch.delenv(SWARM_ENV)
    assert find_swarm_id(None, tmp_path) is None
    write_swarm_id(tmp_path, "ab" * 16)
    assert find_swarm_id(None, tmp_path) == "ab" * 16
    assert find_swarm_id("cd" * 16, tmp_path) == "cd" * 16


# ---- the token file: created, never written through a symlink; read only when this user's alone ----------


def test_the_token_file_is_created_for_its_owner_alone_and_a_restart_reads_it_back(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    old_umask = os.umask(0)  # a permissive umask must not widen the file's mode
    try:
        token = new_token()
        path = write_token(tmp_path / "run", token)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    assert find_token(None, tmp_path / "run") == token
    assert write_token(tmp_path / "run", token) == path  # a restart that read it back and writes it again
    with pytest.raises(AdmissionError, match=f"{path} already exists and holds another join token: remove it"):
        write_token(tmp_path / "run", new_token())
    assert path.read_text() == token + "\n"


def test_the_token_is_never_written_through_a_symlink(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not yours\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / TOKEN_FILE).symlink_to(elsewhere)
    with pytest.raises(AdmissionError, match=f"{run / TOKEN_FILE} is a symlink"):
        write_token(run, new_token())
    (run / TOKEN_FILE).unlink()
    (run / TOKEN_FILE).symlink_to(tmp_path / "dangling")  # a symlink to nothing is not followed either
    with pytest.raises(AdmissionError, match="is a symlink"):
        write_token(run, new_token())
    assert elsewhere.read_text() == "not yours\n" and not (tmp_path / "dangling").exists()


def test_a_token_file_that_is_a_symlink_open_to_others_or_not_ours_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    token = new_token()
    path = write_token(tmp_path, token)
    path.chmod(0o644)
    with pytest.raises(AdmissionError, match=rf"{path} \(mode 0o644, owner .*uid {os.getuid()}\).*`chmod 600 {path}`"):
        find_token(None, tmp_path)
    path.chmod(0o600)
    real_uid = os.getuid()
    monkeypatch.setattr(admission_mod.os, "getuid", lambda: real_uid + 1)  # as another user would read it
    with pytest.raises(AdmissionError, match=f"must belong to this user .*uid {real_uid + 1}"):
        find_token(None, tmp_path)
    monkeypatch.undo()
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    link_dir = tmp_path / "linked"
    link_dir.mkdir()
    (link_dir / TOKEN_FILE).symlink_to(path)  # a good file, through a symlink
    with pytest.raises(AdmissionError, match=f"{link_dir / TOKEN_FILE} is a symlink"):
        find_token(None, link_dir)
    assert find_token(None, tmp_path) == token
    assert find_token(None, tmp_path / "nothing-here") is None


def test_the_flag_and_the_variable_still_come_before_the_file(tmp_path, monkeypatch):
    path = write_token(tmp_path, new_token())
    path.chmod(0o666)  # never read while a token is given otherwise
    given, env = new_token(), new_token()
    monkeypatch.setenv(TOKEN_ENV, env)
    assert find_token(given, tmp_path) == given
    assert find_token(None, tmp_path) == env


def test_scrub_secrets_takes_the_token_and_the_key_out_of_the_environment(monkeypatch):
    token, seed = new_token(), "11" * 32
    monkeypatch.setenv(TOKEN_ENV, token)
    monkeypatch.setenv(KEY_ENV, seed)
    assert find_token() == token and Identity.from_env("p").seed_hex() == seed
    scrub_secrets()
    assert TOKEN_ENV not in os.environ and KEY_ENV not in os.environ
    scrub_secrets()  # twice is fine
