"""The flow-sync datagram: header layout, HMAC-SHA256 authentication, the cluster keyring.

One UDP datagram = a fixed 56-byte header, a payload, and a 32-byte HMAC-SHA256 tag over
header + payload. All integers are big-endian (network order).

    off size field
      0  2   magic           0x4853 ("HS": HyperPlane Sync)
      2  1   version         1
      3  1   type            DATA 1, ACK 2, NACK 3, ALIVE 4, HELLO 5
      4  2   key_id          which cluster key made the tag
      6  1   flags           bit 0 HELLO_SEEN: the sender has processed the receiver's HELLO
                             of the receiver's current epoch
      7  1   key_size        bytes of a record that identify its flow (checked by the receiver)
      8  4   sender          sender node id
     12  4   receiver        receiver node id: a datagram cannot be replayed to another node
     16  8   sender_epoch    the sender's incarnation: a restarted agent uses a larger one
     24  8   receiver_epoch  the receiver's epoch as the sender knows it (0: not known yet);
                             a datagram addressed to an earlier incarnation of the receiver
                             is refused, so nothing captured before a restart replays after it
     32  8   seq             DATA: this datagram's number in the sender->receiver stream
                             (1, 2, ...); other types: the highest DATA seq sent so far, so
                             the receiver sees a lost tail
     40  8   ack             highest DATA seq received in order from the receiver (range ack)
     48  4   count           DATA: records in the payload; NACK: ranges; others 0
     52  2   record_size     bytes per record (checked by the receiver)
     54  2   reserved        0
     56  ..  payload         DATA: count * record_size bytes of records, delivered as one
                             blob; NACK: count * (first u64, last u64) missing seq ranges
    -32 32   tag             HMAC-SHA256(key[key_id], header + payload)

Records are opaque here: fixed-size byte strings whose first key_size bytes name the flow.
This module only builds and checks bytes; the protocol (streams, acks, resends) lives in
hyperplane.fleet.sync.
"""
from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple

from hyperplane.errors import ConfigError

MAGIC = 0x4853
VERSION = 1

DATA, ACK, NACK, ALIVE, HELLO = 1, 2, 3, 4, 5
TYPE_NAMES = {DATA: "data", ACK: "ack", NACK: "nack", ALIVE: "alive", HELLO: "hello"}

FLAG_HELLO_SEEN = 0x01

HEADER = struct.Struct("!HBBHBBIIQQQQIHH")
HEADER_SIZE = HEADER.size            # 56
TAG_SIZE = 32                        # HMAC-SHA256
OVERHEAD = HEADER_SIZE + TAG_SIZE    # 88 bytes per datagram
RANGE = struct.Struct("!QQ")         # a NACK's missing range: first, last (inclusive)
KEY_BYTES = 32

MAX_U16 = 0xFFFF
MAX_U32 = 0xFFFFFFFF
MAX_U64 = 0xFFFFFFFFFFFFFFFF


class Header(NamedTuple):
    magic: int
    version: int
    type: int
    key_id: int
    flags: int
    key_size: int
    sender: int
    receiver: int
    sender_epoch: int
    receiver_epoch: int
    seq: int
    ack: int
    count: int
    record_size: int
    reserved: int


class Keyring:
    """Cluster keys by id. Datagrams are tagged with the current key; every key still held
    is accepted, so a rotation is: rotate(new) on every node (each still accepts the old
    key), then retire(old) once all nodes send with the new one."""

    def __init__(self, keys: Mapping[int, bytes], current: int):
        self._macs: dict[int, Any] = {}
        self._keys: dict[int, bytes] = {}
        for key_id, key in keys.items():
            self._add(key_id, key)
        if current not in self._keys:
            raise ConfigError(f"Sync key id {current} is current but no such key is given.")
        self.current_id = current

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Keyring":
        """From the store's form: {"current": 2, "keys": {"1": "<64 hex>", "2": "<64 hex>"}}."""
        try:
            raw = d["keys"]
            current = _key_id(d["current"])
            keys = {_key_id(k): _key_bytes(v) for k, v in raw.items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"A sync keyring needs 'current' and 'keys' ({exc}).") from None
        return cls(keys, current)

    def to_dict(self) -> dict[str, Any]:
        return {"current": self.current_id,
                "keys": {str(k): v.hex() for k, v in sorted(self._keys.items())}}

    def _add(self, key_id: int, key: bytes) -> None:
        key_id = _key_id(key_id)
        key = _key_bytes(key)
        if key_id in self._keys and self._keys[key_id] != key:
            raise ConfigError(f"Sync key id {key_id} already holds a different key.")
        self._keys[key_id] = key
        # An HMAC object keyed once and copied per datagram: the key's pads are hashed
        # once here instead of on every datagram (about a third of the per-datagram cost).
        # hmac.HMAC wraps OpenSSL's HMAC object in Python methods; where that object is
        # there (CPython with OpenSSL: ._hmac), it is used directly, same interface,
        # another ~25 % less per datagram. Equality with hmac.digest() is tested.
        mac = hmac.new(key, digestmod=hashlib.sha256)
        self._macs[key_id] = getattr(mac, "_hmac", None) or mac

    def rotate(self, new_id: int, key: bytes) -> None:
        """Send with new_id from now on; the keys held before stay accepted until retired."""
        self._add(new_id, key)
        self.current_id = _key_id(new_id)

    def retire(self, old_id: int) -> None:
        """Stop accepting old_id (never the current key)."""
        if old_id == self.current_id:
            raise ConfigError(f"Sync key id {old_id} is the current key; rotate first.")
        self._keys.pop(old_id, None)
        self._macs.pop(old_id, None)

    def ids(self) -> list[int]:
        return sorted(self._keys)

    def has(self, key_id: int) -> bool:
        return key_id in self._macs

    def tag(self, key_id: int, *parts: bytes) -> bytes:
        """HMAC-SHA256 of the concatenated parts under key_id (KeyError if not held)."""
        h = self._macs[key_id].copy()
        for part in parts:
            h.update(part)
        return h.digest()

    def hasher(self, key_id: int) -> Any:
        """The keyed HMAC object for key_id, or None if the id is not held: callers
        .copy() it and feed it themselves (the hot path, without a call per part)."""
        return self._macs.get(key_id)


def _key_id(value: Any) -> int:
    try:
        key_id = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"Sync key id {value!r} is not an integer.") from None
    if not 0 <= key_id <= MAX_U16:
        raise ConfigError(f"Sync key id {key_id} is outside 0..{MAX_U16}.")
    return key_id


def _key_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        try:
            value = bytes.fromhex(value)
        except ValueError:
            raise ConfigError("A sync key must be 64 hex digits.") from None
    if not isinstance(value, (bytes, bytearray)) or len(value) != KEY_BYTES:
        raise ConfigError(f"A sync key must be {KEY_BYTES} bytes (64 hex digits).")
    return bytes(value)


def encode(keyring: Keyring, header: Header, payload: bytes = b"",
           key_id: int | None = None) -> bytes:
    """A whole datagram (header fields as given, tag under key_id or the current key).
    For tools and tests; the protocol packs its headers itself on the hot path."""
    key_id = keyring.current_id if key_id is None else key_id
    hdr = HEADER.pack(*header._replace(key_id=key_id))
    return hdr + payload + keyring.tag(key_id, hdr, payload)


def peek(data: bytes) -> tuple[Header, bytes]:
    """Header and payload of a datagram without checking its tag (for inspection only;
    ValueError if it is too short to hold a header and a tag)."""
    if len(data) < OVERHEAD:
        raise ValueError(f"a sync datagram has at least {OVERHEAD} bytes, got {len(data)}")
    return Header(*HEADER.unpack_from(data)), bytes(data[HEADER_SIZE:len(data) - TAG_SIZE])


def nack_payload(ranges: list[tuple[int, int]]) -> bytes:
    return b"".join(RANGE.pack(first, last) for first, last in ranges)


def nack_ranges(payload: bytes) -> list[tuple[int, int]]:
    return [r for r in RANGE.iter_unpack(payload)]


def max_records(max_datagram: int, record_size: int) -> int:
    """Records that fit in one DATA datagram of at most max_datagram bytes."""
    return (max_datagram - OVERHEAD) // record_size


def max_ranges(max_datagram: int) -> int:
    return (max_datagram - OVERHEAD) // RANGE.size
