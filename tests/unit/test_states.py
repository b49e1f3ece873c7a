import pytest

from checkfree.swarm.states import TRANSITIONS, IllegalTransition, PeerState, PeerStatus, transition


def test_every_state_has_a_row_and_every_edge_ends_in_a_state():
    assert set(TRANSITIONS) == set(PeerState)
    for edges in TRANSITIONS.values():
        assert set(edges) <= set(PeerState)


def test_a_peer_goes_from_waiting_through_training_to_done():
    status = PeerStatus()
    for new in ("joining", "running", "recovering", "joining", "running", "done"):
        assert status.move(new) == new
    assert status.state is PeerState.DONE


@pytest.mark.parametrize(
    "old,new", [("done", "running"), ("spare", "running"), ("waiting", "running"), ("leaving", "joining")]
)
def test_an_edge_outside_the_table_raises_naming_both_states(old, new):
    with pytest.raises(IllegalTransition, match=f"{old} -> {new}"):
        transition(old, new)
    status = PeerStatus(initial=old)
    with pytest.raises(IllegalTransition):
        status.move(new)
    assert status.state == old  # unchanged


def test_the_state_is_written_only_through_move():
    status = PeerStatus(initial="spare")
    with pytest.raises(AttributeError):
        status.state = "running"


def test_an_unknown_state_is_refused():
    with pytest.raises(ValueError, match="'runing'"):
        transition("waiting", "runing")
