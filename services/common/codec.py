"""msgpack encoding of protocol messages into ZeroMQ frames, and back.

Frame 0 is the 1-byte `MessageKind`; frame 1 is `[PROTOCOL_VERSION, *fields]`.
Nested structs become msgpack ext objects (`STRUCT_EXT`) holding
`[StructKind, *fields]`; token-id arrays become `TOKEN_IDS_EXT` holding raw
little-endian int32.  Nothing is ever pickled, and classes are looked up by
their numeric kind, never by name.
"""

from __future__ import annotations

import array
import dataclasses
import sys
from typing import Any

import msgpack

from services.common.protocol import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    STRUCT_TYPES,
    MessageKind,
    StructKind,
)

STRUCT_EXT = 1
TOKEN_IDS_EXT = 2

_LITTLE_ENDIAN = sys.byteorder == "little"


class ProtocolError(ValueError):
    """A frame set that is not a message of this protocol version."""


def _default(obj: Any) -> Any:
    if isinstance(obj, array.array):
        arr = obj if obj.typecode == "i" else array.array("i", obj)
        if not _LITTLE_ENDIAN:
            arr = array.array("i", arr)
            arr.byteswap()
        return msgpack.ExtType(TOKEN_IDS_EXT, arr.tobytes())
    struct_kind = getattr(type(obj), "STRUCT", None)
    if struct_kind is not None and dataclasses.is_dataclass(obj):
        fields = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
        return msgpack.ExtType(STRUCT_EXT, _pack([int(struct_kind), *fields]))
    raise TypeError(f"cannot encode {type(obj).__name__} on the wire")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == TOKEN_IDS_EXT:
        arr = array.array("i")
        arr.frombytes(data)
        if not _LITTLE_ENDIAN:
            arr.byteswap()
        return arr
    if code == STRUCT_EXT:
        kind, *fields = _unpack(data)
        try:
            cls = STRUCT_TYPES[StructKind(kind)]
        except ValueError as exc:
            raise ProtocolError(f"unknown struct kind {kind}") from exc
        return cls(*fields)
    raise ProtocolError(f"unknown msgpack ext code {code}")


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, default=_default, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    # strict_map_key=False: offsets and ids are ints; tuples come back as lists.
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def encode(message: Any) -> list[bytes]:
    """Encode a top-level message as [kind frame, body frame]."""
    kind = type(message).KIND
    fields = [getattr(message, f.name) for f in dataclasses.fields(message)]
    return [bytes([int(kind)]), _pack([PROTOCOL_VERSION, *fields])]


def decode(frames: list[bytes]) -> Any:
    """Decode [kind frame, body frame] into its message dataclass."""
    if len(frames) != 2 or len(frames[0]) != 1:
        raise ProtocolError(f"expected 2 frames with a 1-byte kind, got {len(frames)} frames")
    try:
        cls = MESSAGE_TYPES[MessageKind(frames[0][0])]
    except ValueError as exc:
        raise ProtocolError(f"unknown message kind {frames[0][0]}") from exc
    try:
        version, *fields = _unpack(frames[1])
    except (ValueError, TypeError, msgpack.ExtraData) as exc:
        raise ProtocolError(f"undecodable {cls.__name__} body: {exc}") from exc
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} != {PROTOCOL_VERSION} in {cls.__name__}")
    try:
        return cls(*fields)
    except TypeError as exc:
        raise ProtocolError(f"{cls.__name__} with wrong fields: {exc}") from exc
