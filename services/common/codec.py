"""msgpack encoding of protocol messages into ZeroMQ frames, and validated decoding back.

Frame 0 is the 1-byte `MessageKind`; frame 1 is `[PROTOCOL_VERSION, message]`
with the message a positional msgpack array (`protocol.Wire`).  Token-id arrays
travel as msgpack bin holding raw little-endian int32.  Each kind has its own
typed msgspec decoder: a body of the wrong shape or types is refused whole
(`ProtocolError`), never half-built, and nesting can go no deeper than the
declared types.  Nothing is ever pickled, and classes are looked up by their
numeric kind, never by name.
"""

from __future__ import annotations

import array
import sys
from typing import Any

import msgspec

from services.common.protocol import MESSAGE_TYPES, PROTOCOL_VERSION, MessageKind

# Far above any legitimate message (the gateway bounds what a request can make
# the pipeline produce), low enough that a runaway peer cannot exhaust memory.
MAX_BODY_BYTES = 256 * 1024 * 1024

_LITTLE_ENDIAN = sys.byteorder == "little"


class ProtocolError(ValueError):
    """A frame set that is not a message of this protocol version."""


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, array.array):
        arr = obj if obj.typecode == "i" else array.array("i", obj)
        if not _LITTLE_ENDIAN:
            arr = array.array("i", arr)
            arr.byteswap()
        return arr.tobytes()
    raise TypeError(f"cannot encode {type(obj).__name__} on the wire")


def _dec_hook(kind: type, obj: Any) -> Any:
    if kind is not array.array:
        raise TypeError(f"no wire decoding for {kind}")
    if isinstance(obj, bytes):
        if len(obj) % 4:
            raise ValueError(f"token ids of {len(obj)} bytes, not a multiple of 4")
        arr = array.array("i")
        arr.frombytes(obj)
        if not _LITTLE_ENDIAN:
            arr.byteswap()
        return arr
    if isinstance(obj, list):  # a sender that built a plain list of ids
        try:
            return array.array("i", obj)
        except (TypeError, OverflowError) as exc:
            raise ValueError(f"token ids: {exc}") from exc
    raise TypeError(f"expected token ids, got {type(obj).__name__}")


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_ENVELOPE = msgspec.msgpack.Decoder(tuple[int, msgspec.Raw])
_DECODERS = {kind: msgspec.msgpack.Decoder(cls, dec_hook=_dec_hook) for kind, cls in MESSAGE_TYPES.items()}


def encode(message: Any) -> list[bytes]:
    """Encode a top-level message as [kind frame, body frame]."""
    return [bytes([int(type(message).KIND)]), _ENCODER.encode((PROTOCOL_VERSION, message))]


def decode(frames: list[bytes]) -> Any:
    """Decode [kind frame, body frame] into its message struct; anything else raises `ProtocolError`."""
    if len(frames) != 2 or len(frames[0]) != 1:
        raise ProtocolError(f"expected 2 frames with a 1-byte kind, got {len(frames)} frames")
    try:
        kind = MessageKind(frames[0][0])
    except ValueError as exc:
        raise ProtocolError(f"unknown message kind {frames[0][0]}") from exc
    name = MESSAGE_TYPES[kind].__name__
    body = frames[1]
    if len(body) > MAX_BODY_BYTES:
        raise ProtocolError(f"{name} body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        version, raw = _ENVELOPE.decode(body)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {version} != {PROTOCOL_VERSION} in {name}")
        return _DECODERS[kind].decode(raw)
    except (msgspec.MsgspecError, RecursionError) as exc:
        raise ProtocolError(f"invalid {name}: {exc}") from exc
