"""
Swarm configuration
===================

The swarm's config sections, as plain dataclasses (``checkfree.config`` composes them into
``TrainConfig`` without loading anything else of the swarm): ``swarm`` (how the multi-process runtime
waits and gives up), ``membership`` (heartbeats and the DHT) and ``transport`` (timeouts, backend), plus
``config_fingerprint``, what peers of one swarm must agree on, and ``check_swarm_config``, what the engine
runs but the swarm refuses.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

SIGNALS = ("SIGKILL", "SIGSTOP")

# ---- addresses (checked here; used by checkfree.swarm.addressing, which binds the sockets) ----------------
WILDCARD = ("0.0.0.0",)


def parse_port_range(spec: str | None) -> tuple[int, int] | None:
    """``"LOW-HIGH"`` -> (low, high), both included; None -> None. Raises ValueError naming the value."""
    if spec is None or spec == "":
        return None
    try:
        low, high = (int(p) for p in str(spec).split("-"))
    except ValueError:
        raise ValueError(f"membership.port_range={spec!r} must look like LOW-HIGH, e.g. 29400-29499") from None
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"membership.port_range={spec!r} must satisfy 1024 <= LOW <= HIGH <= 65535")
    return low, high


def check_hosts(host: str, announce_host: str | None) -> None:
    """Raise ValueError unless ``host`` is an IP address and, if it is the wildcard, ``announce_host`` is set."""
    for name, value in (("host", host), ("announce_host", announce_host)):
        if value is None:
            continue
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise ValueError(f"membership.{name}={value!r} must be an IPv4 address, e.g. 10.0.0.5") from None
    if host in WILDCARD and not announce_host:
        raise ValueError(
            f"membership.host={host!r} listens on every interface, but nobody can dial it: set "
            "membership.announce_host to this host's address that the other peers reach"
        )


@dataclass
class MembershipConfig:
    # how often a peer stores its record in the DHT (what spares, leaders, the launcher and status read). Losses
    # are detected through the probe ports, not the DHT, so this can be slow: every DHT node handles every
    # store, which is most of what the failure-free swarm pays (0.91x the static pipeline's tokens/s at 0.5 s,
    # 0.96x at 2 s, measured side by side on 2 cores: docs/results/overhead*.json)
    period_s: float = 2.0
    watch_s: float = 0.5  # how often the members of an epoch read each other's records from their probe ports
    # a member is found frozen only after its heartbeat stalled and fresh probes went unanswered this long on
    # end: a process stopped for less (a GC pause, a starved CPU, a SIGSTOP pulse) is never declared lost;
    # a real hang is detected in about hang_s + watch_s
    hang_s: float = 1.5
    ttl_s: float = 8.0  # a record expires this long after it was stored; keep >= ~4x period_s
    dht_timeout_s: float = 5.0  # limit of every DHT store/get
    # limit of one DHT node's request to another (hivemind's wait_timeout, 3 s by default): a node whose host
    # vanished (no TCP reset) stalls every store and get that asks it for this long, which can outlast ttl_s
    rpc_timeout_s: float = 1.5
    startup_timeout_s: float = 60.0  # limit for the DHT and its p2p daemon to start
    host: str = "127.0.0.1"  # IPv4 address every socket of this peer binds (0.0.0.0: every interface)
    announce_host: str | None = None  # address the others dial, if not host (required with 0.0.0.0)
    # a network interface (eth0, ens5, wg0, tailscale0) whose IPv4 address this peer binds and announces: the
    # VPC's private address, or a VPN/overlay's; replaces host and announce_host
    interface: str | None = None
    # behind NAT (a VM whose public address sits on no interface): announce_host is what the DHT and probes
    # announce, while gloo binds and announces this host's own address (so the peers must still reach each
    # other's own addresses for data: one VPC or a VPN). Off: every announced address must be this host's.
    nat: bool = False
    port_range: str | None = None  # "LOW-HIGH": the DHT, probe and rendezvous ports (for firewalls); None: any
    poll_s: float = 0.1  # how often a peer between epochs polls the DHT (spares: every period_s; knocks wake both)
    dht_retries: int = 2  # a DHT call that times out is retried this often (backoff 0.1 s, 0.2 s, ...)
    epoch_ttl_s: float = 3600.0  # an epoch record's expiry; members re-store it every epoch_ttl_s / 4
    # fault injection, for tests and chaos runs only
    fault_blind_s: float = 0.0  # this peer's DHT reads return nothing for this long after it starts
    fault_timeout_rate: float = 0.0  # share of this peer's DHT calls that fail as if they timed out

    def __post_init__(self) -> None:
        if self.period_s <= 0 or self.ttl_s <= self.period_s:
            raise ValueError(
                f"membership.ttl_s={self.ttl_s} must exceed membership.period_s={self.period_s} > 0 "
                "(keep ttl_s >= ~4x period_s)"
            )
        for name in ("dht_timeout_s", "startup_timeout_s", "poll_s", "epoch_ttl_s", "watch_s", "rpc_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"membership.{name}={getattr(self, name)} must be > 0")
        if self.hang_s < 0.5:
            raise ValueError(f"membership.hang_s={self.hang_s} must be >= 0.5 (one probe timeout)")
        # every node of a swarm refuses records that expire further ahead than these caps (whatever its own
        # settings, so that peers and observers configured differently still accept each other's records)
        if self.ttl_s > MEMBER_TTL_CAP_S or self.epoch_ttl_s > EPOCH_TTL_CAP_S:
            raise ValueError(
                f"membership.ttl_s={self.ttl_s} must be <= {MEMBER_TTL_CAP_S:.0f} and epoch_ttl_s="
                f"{self.epoch_ttl_s} <= {EPOCH_TTL_CAP_S:.0f} (the swarm's validators refuse longer-lived records)"
            )
        if self.interface is None:
            check_hosts(self.host, self.announce_host)
        elif not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}", self.interface):
            raise ValueError(f"membership.interface={self.interface!r} is not an interface name (e.g. eth0, wg0)")
        if self.nat and not self.announce_host:
            raise ValueError("membership.nat=true needs membership.announce_host (the address behind the NAT)")
        parse_port_range(self.port_range)
        if self.dht_retries < 0 or self.fault_blind_s < 0 or not 0.0 <= self.fault_timeout_rate < 1.0:
            raise ValueError(
                f"membership.dht_retries={self.dht_retries} and fault_blind_s={self.fault_blind_s} must be >= 0, "
                f"fault_timeout_rate={self.fault_timeout_rate} in [0, 1)"
            )


MEMBER_TTL_CAP_S = 3600.0  # the longest expiration of a member record the swarm's DHT nodes accept
EPOCH_TTL_CAP_S = 7 * 86400.0  # the same for epoch records


@dataclass
class TransportConfig:
    timeout_s: float = 10.0  # limit of every send, receive and collective wait
    rendezvous_timeout_s: float = 30.0  # limit for all peers of an epoch to join its store
    backend: str = "auto"  # auto (gloo on cpu, nccl on cuda), gloo or nccl
    # fault injection, for tests and chaos runs only: from step fault_cut_at_step on, the peer with this id
    # loses its data plane (its group's connections are cut, no group forms) while it keeps heartbeating and
    # answering its probe, as a host whose firewall starts dropping the gloo ports would
    fault_cut_peer: str | None = None  # a peer's id or name (the NAME of NAME.HASH)
    fault_cut_at_step: int = 0  # the step from which fault_cut_peer loses its data plane

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.rendezvous_timeout_s <= 0:
            raise ValueError(
                f"transport timeouts must be > 0, got timeout_s={self.timeout_s}, "
                f"rendezvous_timeout_s={self.rendezvous_timeout_s}"
            )
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"transport.backend={self.backend!r} is not one of auto, gloo, nccl")


CHAOS_KINDS = (
    "kill",  # SIGKILL one stage peer
    "burst",  # SIGKILL 2 .. L-1 stage peers at once
    "wave",  # SIGKILL half of all peers (stage peers and spares) at once
    "hang",  # SIGSTOP one stage peer (killed once the swarm has replaced it)
    "leader_after_publish",  # SIGKILL the peer that publishes the next epoch, right after it does
    "source_during_transfer",  # SIGKILL a source of the next epoch's rebuild plan as it starts
    "spare_during_join",  # SIGKILL the spare that the next epoch names for a lost stage
    "rebuilt_before_first_step",  # SIGKILL the next rebuilt stage's peer before its first step
    "spare_kill",  # SIGKILL a waiting spare
    "spare_arrival",  # start one more spare now
    # benign kinds: stress that is no failure (no stage may be lost to it; the soak checks that none is)
    "probe_flood",  # idle and trickling connections plus a knock flood at one live stage peer's probe port
    "starve",  # SIGSTOP pulses shorter than membership.hang_s, and busy loops beside, on live stage peers
)
BENIGN_CHAOS_KINDS = ("probe_flood", "starve")


@dataclass
class ChaosConfig:
    """Launcher: failures drawn from a seed that land at any moment, during recoveries too (``events`` > 0
    replaces the failure trace). The same seed draws the same sequence of kinds, gaps and choices."""

    events: int = 0  # how many to inject (0: chaos off)
    seed: int = 0  # seeds the kinds, gaps and choices of the events
    mean_gap_s: float = 2.0  # mean of the exponential gap between two events (at least 0.2 s)
    kinds: list[str] = field(default_factory=lambda: list(CHAOS_KINDS))  # drawn with equal weight
    trigger_timeout_s: float = 15.0  # a triggered kind that does not fire in time is dropped
    # probe_flood: what an attacker without the token can do to a probe port from the same network
    flood_s: float = 3.0  # how long one flood lasts
    num_flood_conns: int = 500  # idle or trickling connections held open at once (reopened as the peer drops them)
    flood_knocks_per_s: float = 200.0  # knocks a second beside them (connect, b"!" and a random nonce, read, close)
    # starve: each pulse stops the peer for a share of membership.hang_s drawn in [pulse_min_frac, pulse_max_frac]
    # (below 1: a pulse is never a hang), then lets it run for hang_s, so its watchers see it answer in between
    num_pulses: int = 3  # SIGSTOP pulses in a row on each starved peer
    pulse_min_frac: float = 0.3  # shortest pulse, a share of membership.hang_s
    pulse_max_frac: float = 0.8  # longest pulse, a share of membership.hang_s (< 1)
    busy_s: float = 3.0  # a busy loop (another tenant's process) runs beside each starved peer this long; 0: none

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in CHAOS_KINDS]
        if bad or not self.kinds:
            raise ValueError(f"swarm.chaos.kinds={list(self.kinds)}: expected a non-empty subset of {CHAOS_KINDS}")
        if self.events < 0 or self.mean_gap_s <= 0 or self.trigger_timeout_s <= 0:
            raise ValueError(
                f"swarm.chaos: events={self.events} must be >= 0, mean_gap_s={self.mean_gap_s} and "
                f"trigger_timeout_s={self.trigger_timeout_s} > 0"
            )
        if self.flood_s <= 0 or self.num_flood_conns < 0 or self.flood_knocks_per_s < 0:
            raise ValueError(
                f"swarm.chaos: flood_s={self.flood_s} must be > 0, num_flood_conns={self.num_flood_conns} and "
                f"flood_knocks_per_s={self.flood_knocks_per_s} >= 0"
            )
        if self.num_pulses < 1 or self.busy_s < 0 or not 0 < self.pulse_min_frac <= self.pulse_max_frac < 1:
            raise ValueError(
                f"swarm.chaos: num_pulses={self.num_pulses} must be >= 1, busy_s={self.busy_s} >= 0 and "
                f"0 < pulse_min_frac={self.pulse_min_frac} <= pulse_max_frac={self.pulse_max_frac} < 1 "
                "(a pulse as long as membership.hang_s is a hang, not starvation)"
            )


PREEMPTION_PROVIDERS = ("none", "aws", "gcp")
# where each cloud announces a preemption (used only when swarm.preemption.provider names the cloud and
# swarm.preemption.url is not set; never contacted otherwise)
PREEMPTION_URLS = {
    "aws": "http://169.254.169.254/latest/meta-data/spot/instance-action",  # 404 until a notice, then JSON
    "gcp": "http://metadata.google.internal/computeMetadata/v1/instance/preempted",  # "TRUE" once preempted
}


@dataclass
class PreemptionConfig:
    """A peer that watches its cloud's preemption notice hands its exact state to a spare and leaves, instead
    of vanishing and being rebuilt. Off unless ``provider`` is set: nothing is contacted otherwise."""

    provider: str = "none"  # none, aws (spot instance-action) or gcp (instance/preempted)
    # the notice's URL; None: the provider's metadata address. ``{name}`` is replaced by the peer's name, so
    # that peers sharing one notice server (tests, emulated hosts) each get their own notice
    url: str | None = None
    poll_s: float = 1.0  # how often the notice is read
    request_timeout_s: float = 0.5  # limit of one read of the notice
    # after a notice, the peer leaves within this long: at once when a spare takes its state, else when the
    # time is up (the swarm then rebuilds the stage as after any loss). GCP gives 30 s, AWS 2 minutes
    leave_within_s: float = 25.0
    handoff_timeout_s: float = 20.0  # limit of one transfer of the state to a spare (within leave_within_s)

    def __post_init__(self) -> None:
        if self.provider not in PREEMPTION_PROVIDERS:
            raise ValueError(f"swarm.preemption.provider={self.provider!r} is not one of {PREEMPTION_PROVIDERS}")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"swarm.preemption.url={self.url!r}: expected an http:// or https:// URL")
        for name in ("poll_s", "request_timeout_s", "leave_within_s", "handoff_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"swarm.preemption.{name}={getattr(self, name)} must be > 0")
        if self.handoff_timeout_s > self.leave_within_s:
            raise ValueError(
                f"swarm.preemption.handoff_timeout_s={self.handoff_timeout_s} must not exceed leave_within_s="
                f"{self.leave_within_s}: the leaving peer stops serving its state then"
            )

    def notice_url(self, name: str) -> str | None:
        """The URL this peer polls, or None when preemption notices are off."""
        if self.provider == "none":
            return None
        return (self.url or PREEMPTION_URLS[self.provider]).replace("{name}", name)


@dataclass
class SwarmConfig:
    run_id: str | None = None  # swarm identity on the DHT; None: the run_name
    num_spares: int = 1  # spare peers the local launcher starts with
    spare_delay_s: float = 3.0  # launcher: a fresh spare arrives this long after each kill (a new spot instance)
    spare_wait_s: float = 60.0  # how long a swarm missing a stage waits for a spare before it gives up
    first_epoch_grace_s: float = 20.0  # before the first epoch, spares fill stages no stage peer took after this
    hang_fraction: float = 0.0  # share of injected failures that freeze a peer (SIGSTOP) instead of killing it
    # who injects failures: each peer its own, at the engine's iteration and op (peer: replays the engine's
    # trace exactly), or the launcher from outside when it polls (launcher: delayed by recoveries and min_gap_s)
    inject: str = "peer"
    min_gap_s: float = 4.0  # inject=launcher: no new failure sooner than this after the swarm last resumed
    run_timeout_s: float = 1800.0  # launcher: stop the swarm (and say so) after this long
    status_interval_s: float = 1.0  # launcher: refresh of the status line
    max_reforms: int = 5  # epochs in a row that may break at one step with every member alive before the swarm stops
    chaos: ChaosConfig = field(default_factory=ChaosConfig)  # launcher: failures during recoveries
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)  # peers: cloud preemption notices
    # launcher: where peers run. local: processes on this machine, over loopback; netns: each peer on an
    # emulated host of its own (a Linux network namespace on a bridge; needs root), see launcher/netns.py
    hosts: str = "local"
    # launcher: the device of each peer it starts, in turn (peer k gets devices[k mod len]); empty: with
    # device=cuda the peers are spread over every visible GPU (peer k on cuda:k mod N), else all on device
    devices: list[str] = field(default_factory=list)
    # peers: copy each peer's events, metrics and log to LOG_URL/peers/<peer id>/ every log_every_s and when it
    # ends (a path or an fsspec URL such as s3://bucket/run), so that they outlive a spot VM; None: not copied
    log_url: str | None = None
    log_every_s: float = 30.0  # how often a peer copies its changed files to log_url
    log_storage_options: dict[str, Any] = field(default_factory=dict)  # for the fsspec filesystem of log_url
    host_rate_mbit: float = 0.0  # netns: bandwidth limit of each host's link, each direction; 0: none
    # netns: share of injected failures in which the victim's host vanishes (its link goes down: no TCP reset,
    # detected through the silent probe) instead of its process being killed or frozen
    vanish_fraction: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "spare_delay_s",
            "spare_wait_s",
            "first_epoch_grace_s",
            "min_gap_s",
            "run_timeout_s",
            "status_interval_s",
            "log_every_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"swarm.{name}={getattr(self, name)} must be >= 0")
        if self.max_reforms < 1:
            raise ValueError(f"swarm.max_reforms={self.max_reforms} must be >= 1")
        if self.num_spares < 0:
            raise ValueError(f"swarm.num_spares={self.num_spares} must be >= 0")
        if self.hosts not in ("local", "netns"):
            raise ValueError(f"swarm.hosts={self.hosts!r} is not one of local, netns")
        if self.host_rate_mbit < 0:
            raise ValueError(f"swarm.host_rate_mbit={self.host_rate_mbit} must be >= 0 (0: no limit)")
        if not 0.0 <= self.vanish_fraction <= 1.0:
            raise ValueError(f"swarm.vanish_fraction={self.vanish_fraction} must be in [0, 1]")
        if self.vanish_fraction and self.hosts != "netns":
            raise ValueError(
                f"swarm.vanish_fraction={self.vanish_fraction} needs swarm.hosts=netns (a host whose link can be cut)"
            )
        if self.inject not in ("peer", "launcher"):
            raise ValueError(f"swarm.inject={self.inject!r} is not one of peer, launcher")
        if self.hang_fraction + self.vanish_fraction > 1.0:
            raise ValueError(
                f"swarm.hang_fraction={self.hang_fraction} + swarm.vanish_fraction={self.vanish_fraction} must be <= 1"
            )
        if not 0.0 <= self.hang_fraction <= 1.0:
            raise ValueError(f"swarm.hang_fraction={self.hang_fraction} must be in [0, 1]")


def check_swarm_config(cfg) -> None:
    """Raise ValueError, saying why and what to set, for a ``TrainConfig`` the engine runs and the swarm does
    not (``checkfree swarm`` asks before it starts anything; every peer asks again)."""
    rec = cfg.recovery
    if rec.strategy == "redundant" and cfg.swap_enabled:
        raise ValueError(
            "recovery.strategy=redundant with pipeline.swap=true: in the swarm a shadow's input is its holder's "
            "own output, which needs the plain route; set pipeline.swap=false"
        )
    if rec.strategy == "hybrid" and not cfg.checkpoint.every_steps:
        raise ValueError(
            "recovery.strategy=hybrid with checkpoint.every_steps=0: in the swarm every stage peer writes its own "
            "file and a step is a checkpoint only once all have written it, so they must save the same steps; "
            "set checkpoint.every_steps (e.g. the cost model's interval, scripts/whatif.py)"
        )
    if rec.optimizer_init != "fresh":
        raise ValueError(
            f"recovery.optimizer_init={rec.optimizer_init} is an engine experiment: swarm peers do not send Adam "
            "moments yet; use recovery.optimizer_init=fresh"
        )


def config_fingerprint(cfg) -> str:
    """A short hash of everything peers of one swarm must agree on (model, data, schedule, optimizer,
    recovery, seed and length); a peer with another fingerprint is refused."""
    from omegaconf import OmegaConf

    parts = {
        k: OmegaConf.to_container(OmegaConf.structured(getattr(cfg, k)))
        for k in ("model", "data", "pipeline", "optim", "recovery")
    }
    parts.update(seed=cfg.seed, num_steps=cfg.num_steps, swap=cfg.swap_enabled)
    if cfg.precision != "fp32":  # bf16 peers send bf16 activations: every peer must agree (fp32 runs keep their hash)
        parts.update(precision=cfg.precision)
    return hashlib.sha1(repr(sorted(parts.items())).encode()).hexdigest()[:12]
