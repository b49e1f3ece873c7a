"""
Admission
=========

Who may take part in a swarm, and how every record proves where it comes from.

- **The join token** is the swarm's secret. ``checkfree swarm`` (or the first ``checkfree peer``) creates it and
  writes it to ``RUN_DIR/join_token`` (mode 0600); every other peer gets it by ``--join-token`` or the
  ``CHECKFREE_JOIN_TOKEN`` environment variable. It is never logged, nor written into a run's config. The file
  is created, never overwritten nor written through a symlink, and read back only from a regular file of the
  reader's own that no other user can reach (``read_token``). ``scrub_secrets`` removes the token and the peer's
  key from the environment once read, so that no process started afterwards (p2pd) inherits them.
- **The swarm's id** (32 hex characters) is created with each new swarm, never derived from the token: the peer
  that starts a swarm (or ``checkfree swarm``) draws a new one every time and writes it to ``RUN_DIR/swarm_id``;
  every joiner gets it by ``--swarm-id``, ``$CHECKFREE_SWARM_ID`` or that file. It is not a secret, but it is
  bound into every seal's MAC, so a record of another run, even one with the same token and run id (the same
  exported ``$CHECKFREE_JOIN_TOKEN``, or a swarm restarted in the same run directory), is refused like one of
  another token.
- **A peer's identity** is an Ed25519 key pair; its peer id is ``NAME.HASH``, where HASH is the first 8 bytes
  (hex) of the SHA-256 of its public key. Only the holder of the private key can speak under that id.
- **A sealed record** carries the body, the signer's id and public key, the signer's Ed25519 signature and
  an HMAC under a key derived from the join token, both over a *context* (for DHT records: key, subkey and
  expiration; for probe answers and pushed epochs: a label) and the body. A record without a valid MAC comes
  from a process without the token; one whose signature or id does not match its key was forged.
- ``SwarmValidator`` is the hivemind record validator that every node of the swarm runs: it signs the
  records this node stores, and refuses to store or return any record that is not sealed for this swarm,
  whose size or expiration is out of bounds, whose body fails the schema, whose member subkey is not its
  signer's own id (a heartbeat under another peer's id), or whose epoch record is not signed by that epoch's
  leader or a member of its roster. Records are refused by the nodes that would store them and by the nodes
  that read them, so a node run by an intruder can neither plant a record nor serve one.

What this does not cover (see the README's security section): the DHT's reads are open (anyone who reaches a
DHT port can read the records, which hold no secret), and gloo's data connections are neither authenticated
nor encrypted: the rendezvous store that hands their addresses out admits members only, but a swarm that must
resist an attacker on its network runs inside a private network (a VPN such as WireGuard).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pwd
import re
import secrets
import stat
import struct
import time
from pathlib import Path

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

logger = logging.getLogger(__name__)

TOKEN_ENV = "CHECKFREE_JOIN_TOKEN"
KEY_ENV = "CHECKFREE_PEER_KEY"  # a launcher that names its peers hands each its private key (hex seed) this way
TOKEN_FILE = "join_token"
TOKEN_PREFIX = "cfj1_"
SWARM_ENV = "CHECKFREE_SWARM_ID"
SWARM_FILE = "swarm_id"
_SWARM_RE = re.compile(r"^[0-9a-f]{32}$")
_TOKEN_RE = re.compile(r"^cfj1_[A-Za-z0-9_-]{43}$")  # 32 random bytes, base64url without padding
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
ID_HASH_BYTES = 8
MAGIC = b"cf1"
MAX_SEALED_BYTES = 1 << 17  # 128 KiB: far above any record of a swarm of hundreds of stages


class AdmissionError(ValueError):
    """A join token or peer name that cannot be used (the message says what was expected)."""


class ForeignToken(ValueError):
    """A sealed record whose MAC is not this swarm's: it was sealed with another join token."""


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_token(token: str) -> str:
    """The token itself, or an error that says what a token looks like (never echoing the value: a
    mistyped token is still most of a secret)."""
    token = token.strip()
    if not _TOKEN_RE.match(token):
        raise AdmissionError(
            f"the join token is not valid ({len(token)} characters): expected '{TOKEN_PREFIX}' followed by 43 "
            f"characters of A-Z a-z 0-9 _ - (as created by `checkfree swarm` or the first `checkfree peer`, in "
            f"RUN_DIR/{TOKEN_FILE})"
        )
    return token


def new_swarm_id() -> str:
    return secrets.token_hex(16)


def check_swarm_id(swarm_id: str) -> str:
    swarm_id = swarm_id.strip()
    if not _SWARM_RE.match(swarm_id):
        raise AdmissionError(
            f"the swarm id {swarm_id[:40]!r} is not valid: expected 32 characters of 0-9 a-f (as written to "
            f"RUN_DIR/{SWARM_FILE} by the peer that started the swarm, or by `checkfree swarm`)"
        )
    return swarm_id


def find_swarm_id(flag: str | None = None, run_dir: str | Path | None = None) -> str | None:
    """The swarm's id from ``--swarm-id``, else ``$CHECKFREE_SWARM_ID``, else ``RUN_DIR/swarm_id`` (None: none).

    Raises:
        AdmissionError: the id found is malformed (the message says where it came from).
    """
    found, where = flag, "--swarm-id"
    if not found and os.environ.get(SWARM_ENV):
        found, where = os.environ[SWARM_ENV], f"${SWARM_ENV}"
    path = Path(run_dir) / SWARM_FILE if run_dir is not None else None
    if not found and path is not None and path.is_file():
        found, where = path.read_text(errors="replace")[:100], str(path)
    if not found:
        return None
    try:
        return check_swarm_id(found)
    except AdmissionError as e:
        raise AdmissionError(f"{e} (from {where})") from None


def write_swarm_id(run_dir: str | Path, swarm_id: str) -> Path:
    """Save a new swarm's id as ``RUN_DIR/swarm_id`` for the peers that join it from this run directory
    (replacing the file of an earlier swarm there, atomically: a reader sees the old id or the new one)."""
    path = Path(run_dir) / SWARM_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{SWARM_FILE}.{os.getpid()}")
    tmp.write_text(check_swarm_id(swarm_id) + "\n")
    os.replace(tmp, path)  # replaces a symlink itself, never writes through it
    return path


def find_token(flag: str | None = None, run_dir: str | Path | None = None) -> str | None:
    """The join token from ``--join-token``, else ``$CHECKFREE_JOIN_TOKEN``, else ``RUN_DIR/join_token``.

    Raises:
        AdmissionError: the token is malformed, or ``RUN_DIR/join_token`` is not safe to trust (``read_token``).
    """
    token = flag or os.environ.get(TOKEN_ENV)
    if not token and run_dir is not None:
        token = read_token(Path(run_dir) / TOKEN_FILE)
    return check_token(token) if token else None


def read_token(path: str | Path) -> str | None:
    """The token saved at ``path`` (None when there is no file), read only from a regular file of this user's
    that no other user may read or write: through a symlink or a file another user can reach, the secret could
    be someone else's choice, or no longer a secret.

    Raises:
        AdmissionError: ``path`` is a symlink, not a regular file, not this user's, or open to other users; the
            message names the path, its mode and owner, and the fix.
    """
    try:
        # O_NOFOLLOW: a symlink fails to open (ELOOP) instead of being read through; fstat then checks the very
        # file that was opened, not whatever the path names a moment later. O_NONBLOCK: a FIFO does not hang.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        try:
            st = os.lstat(path)
        except OSError:
            raise AdmissionError(f"cannot read the join token {path}: {e.strerror or e}") from e
        if stat.S_ISLNK(st.st_mode):
            raise AdmissionError(
                f"{path} is a symlink: the join token is read from a regular file only; remove it, then pass the "
                f"token with --join-token or ${TOKEN_ENV} (or let the first peer write a new one)"
            ) from e
        raise AdmissionError(f"cannot read the join token {path} ({_mode_and_owner(st)}): {e.strerror or e}") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise AdmissionError(f"{path} is not a regular file: the join token is read from a regular file only")
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise AdmissionError(
                f"{path} ({_mode_and_owner(st)}) must belong to this user ({_user(os.getuid())}) and be open to "
                f"it alone: run `chmod 600 {path}` as its owner, or remove it and pass the token with "
                f"--join-token or ${TOKEN_ENV}"
            )
        return f.read(4096).decode("utf-8", errors="replace")  # a token is 48 characters: never read a huge file


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _mode_and_owner(st: os.stat_result) -> str:
    return f"mode {stat.S_IMODE(st.st_mode):#o}, owner {_user(st.st_uid)}"


def write_token(run_dir: str | Path, token: str) -> Path:
    """Save the token as ``RUN_DIR/join_token``, readable by this user only. The file is created, never
    replaced nor written through a symlink: one already there is left as it is, and accepted only when it
    holds this very token and passes ``read_token`` (a restart that read it back).

    Raises:
        AdmissionError: a file (or symlink) is already there holding another token, or cannot be trusted
            (``read_token``); the message names the path and says to remove it or pass its token.
    """
    path = Path(run_dir) / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, stat.S_IRUSR | stat.S_IWUSR)
    except FileExistsError:
        held = read_token(path)
        if held is not None and hmac.compare_digest(held.strip().encode(), token.encode()):
            return path
        raise AdmissionError(
            f"{path} already exists and holds another join token: remove it to start a new swarm there, or pass "
            f"its token with --join-token or ${TOKEN_ENV}"
        ) from None
    with os.fdopen(fd, "w") as f:
        try:
            os.fchmod(f.fileno(), stat.S_IRUSR | stat.S_IWUSR)  # exactly 0600, whatever the umask left
            f.write(token + "\n")
            f.flush()
        except BaseException:
            os.unlink(path)  # never a torn token file, which a restart would then refuse
            raise
    return path


def scrub_secrets() -> None:
    """Remove ``$CHECKFREE_JOIN_TOKEN`` and ``$CHECKFREE_PEER_KEY`` from this process's environment, once their
    values are read (``find_token``, ``Identity.from_env``): every process started afterwards (the DHT's
    p2pd daemon, a shell a hook runs) inherits the environment, and none of them needs the secrets."""
    for name in (TOKEN_ENV, KEY_ENV):
        os.environ.pop(name, None)


def _key_hash(public: bytes) -> str:
    return hashlib.sha256(public).digest()[:ID_HASH_BYTES].hex()


def id_matches_key(peer_id: str, public: bytes) -> bool:
    name, _, tail = peer_id.rpartition(".")
    return bool(name) and hmac.compare_digest(tail, _key_hash(public))


class Identity:
    """A peer's key pair and the id it gives: ``NAME.HASH``."""

    def __init__(self, name: str | None = None, seed: bytes | None = None):
        name = name if name is not None else secrets.token_hex(4)
        if not _NAME_RE.match(name):
            raise AdmissionError(f"peer name {name!r} is not valid: expected 1-32 characters of A-Z a-z 0-9 _ -")
        self._key = Ed25519PrivateKey.from_private_bytes(seed) if seed is not None else Ed25519PrivateKey.generate()
        self.public = self._key.public_key().public_bytes_raw()
        self.name = name
        self.peer_id = f"{name}.{_key_hash(self.public)}"

    @classmethod
    def from_env(cls, name: str | None) -> Identity:
        """The key a launcher handed over in ``$CHECKFREE_PEER_KEY`` (then the peer's id is known before it
        starts), else a new one."""
        seed = os.environ.get(KEY_ENV)
        if not seed:
            return cls(name)
        try:
            raw = bytes.fromhex(seed)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise AdmissionError(f"${KEY_ENV} is not a key: expected 64 hex characters, got {len(seed)} characters")
        return cls(name, raw)

    def seed_hex(self) -> str:
        from cryptography.hazmat.primitives import serialization

        raw = self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return raw.hex()

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


class Admission:
    """Seals and opens records with the swarm's token and id and this peer's identity. ``swarm_id`` None: no
    swarm id in the seals (a tool reading records of a single test swarm; every peer has one)."""

    def __init__(self, token: str, identity: Identity | None = None, swarm_id: str | None = None):
        key = b"checkfree join token v1|" + check_token(token).encode()
        if swarm_id is not None:
            key += b"|swarm|" + check_swarm_id(swarm_id).encode()
        self._mac_key = hashlib.sha256(key).digest()
        self.identity = identity or Identity()
        self.swarm_id = swarm_id

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def seal(self, context: bytes, body: bytes) -> bytes:
        signer, public = self.identity.peer_id, self.identity.public
        message = _message(context, body, signer, public)
        mac = hmac.new(self._mac_key, message, hashlib.sha256).digest()
        return msgpack.packb([MAGIC, body, signer, public, self.identity.sign(message), mac], use_bin_type=True)

    def open(self, context: bytes, blob: bytes) -> tuple[str, bytes]:
        """(signer's peer id, body) of a sealed record; ``ValueError`` saying why it is refused."""
        if not isinstance(blob, bytes | bytearray) or len(blob) > MAX_SEALED_BYTES:
            raise ValueError(f"not a sealed record of at most {MAX_SEALED_BYTES} bytes")
        try:
            magic, body, signer, public, sig, mac = msgpack.unpackb(blob, raw=False, max_bin_len=MAX_SEALED_BYTES)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise ValueError(f"not a sealed record: {type(e).__name__}") from e
        if magic != MAGIC or not all(isinstance(x, bytes) for x in (body, public, sig, mac)):
            raise ValueError("not a sealed record of this version")
        if not isinstance(signer, str) or len(public) != 32:
            raise ValueError("malformed signer")
        message = _message(context, body, signer, public)
        if not hmac.compare_digest(hmac.new(self._mac_key, message, hashlib.sha256).digest(), mac):
            raise ForeignToken("not sealed with this swarm's join token and id")
        if not id_matches_key(signer, public):
            raise ValueError(f"signer id {signer!r} does not belong to the key that signed")
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(sig, message)
        except InvalidSignature as e:
            raise ValueError(f"bad signature for {signer!r}") from e
        return signer, body


def _message(context: bytes, body: bytes, signer: str, public: bytes) -> bytes:
    return msgpack.packb([context, body, signer, public], use_bin_type=True)


def dht_context(key: bytes, subkey: bytes, expiration_time: float) -> bytes:
    return (
        b"dht|"
        + struct.pack("!H", len(key))
        + key
        + struct.pack("!H", len(subkey))
        + subkey
        + struct.pack("!d", expiration_time)
    )


class RateLimitedLog:
    """Log each distinct reason once a minute at most (refused records can arrive many times a second)."""

    def __init__(self, every_s: float = 60.0):
        self.every_s, self._last = every_s, {}

    def __call__(self, reason: str) -> None:
        now = time.monotonic()
        if now - self._last.get(reason, -1e9) >= self.every_s:
            self._last[reason] = now
            logger.warning("refused a DHT record: %s", reason)
