"""The seal every node checks before it stores or returns a record: size bound, token and signer."""

import pytest

from checkfree.swarm.admission import MAX_SEALED_BYTES, dht_context, new_token
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
