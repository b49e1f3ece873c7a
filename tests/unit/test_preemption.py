"""Reading a preemption notice (served on loopback by tests.helpers.NoticeServer), and the config's guards."""

import pytest

from checkfree.swarm.config import PreemptionConfig
from checkfree.swarm.preemption import NoticeWatcher, read_notice
from launcher.notices import NoticeServer
from tests.helpers import poll


def test_an_aws_notice_is_read_with_an_imdsv2_token_and_only_for_this_peer():
    with NoticeServer() as server:
        cfg = PreemptionConfig(provider="aws", url=server.url, poll_s=0.05)
        assert read_notice(cfg, cfg.notice_url("s1")) is None  # 404: no notice yet
        server.arm("s1")
        assert '"terminate"' in read_notice(cfg, cfg.notice_url("s1"))
        assert read_notice(cfg, cfg.notice_url("s2")) is None  # another peer's machine
        watcher = NoticeWatcher(cfg, "s1")
        assert poll(lambda: watcher.noticed is not None, timeout_s=5) and "terminate" in watcher.text
        watcher.close()


def test_notices_are_off_unless_configured_and_bad_settings_are_refused():
    assert PreemptionConfig().notice_url("s1") is None  # nothing is ever contacted by default
    watcher = NoticeWatcher(PreemptionConfig(), "s1")
    assert watcher.url is None and watcher.noticed is None and not watcher.deadline_passed()
    assert PreemptionConfig(provider="gcp").notice_url("x").startswith("http://metadata.google.internal/")
    with pytest.raises(ValueError, match=r"provider='azure' is not one of"):
        PreemptionConfig(provider="azure")
    with pytest.raises(ValueError, match=r"expected an http:// or https:// URL"):
        PreemptionConfig(provider="aws", url="169.254.169.254/latest")
    with pytest.raises(ValueError, match=r"leave_within_s=0 must be > 0"):
        PreemptionConfig(provider="aws", leave_within_s=0)


def test_an_unreachable_notice_server_means_no_notice():
    with NoticeServer() as server:
        url = server.url
    cfg = PreemptionConfig(provider="aws", url=url, request_timeout_s=0.2)
    assert read_notice(cfg, cfg.notice_url("s1")) is None  # refused: closed above
