"""Request bodies in a content coding (RFC 9110 8.4): gzip and deflate,
which tritonclient's `request_compression_algorithm` sends, undone before
any route reads the body.

A compressed body is bounded twice: as it is received, like any body, and
as it is inflated, never past the largest body a request may have, so
that a few kilobytes of zeros cannot become gigabytes. Answers go out
uncompressed, which Accept-Encoding always allows: on the links mmengine
serves (loopback, a data-centre network) compressing costs more than the
bytes it saves, and a proxy in front can compress where that is not so.
"""
from __future__ import annotations

import zlib

from mmengine.errors import BadRequest, TooLarge

#: The codings undone, by their names (lower-case); x-gzip is gzip (RFC 9110 8.4.1.3).
DECODED = frozenset({"gzip", "x-gzip", "deflate"})
#: What a 415 says the server takes (its Accept-Encoding).
ACCEPTED = "gzip, deflate, identity"
#: The most codings undone for one body: each layer may take as long to
#: inflate as the largest body (a stored gzip layer is as long as what it
#: holds), and a header of 64 KiB names thousands. Clients send one.
MAX_LAYERS = 2
#: The most gzip members one body may hold: each is inflated on its own
#: (and an empty one inflates to nothing, so no size limit stops them).
MAX_MEMBERS = 64
#: Inflated in this many bytes at a time: the largest piece held twice.
_PIECE = 1 << 20
#: Fed to the inflater this many bytes at a time: what a gzip member leaves
#: over (copied at its end) is no longer.
_WINDOW = 64 << 10


class Longer(Exception):
    """The body inflates past what may be inflated here (decode's `stop_at`)."""


def codings(value: str) -> list[str]:
    """A coding header's codings, in the order they were applied."""
    return [c.strip().lower() for c in value.split(",") if c.strip()]


def layers(applied: list[str]) -> int:
    return sum(coding != "identity" for coding in applied)


def decode(body: bytes, applied: list[str], limit: int, stop_at: int | None = None) -> bytes:
    """`body` with `applied` (codings of DECODED or identity, in the order
    they were applied) undone. TooLarge past `limit` bytes; BadRequest for
    a body that is not what its coding says; Longer past `stop_at`."""
    for coding in reversed(applied):
        if coding != "identity" and body:  # no body (a GET's) is no stream either
            body = _inflate(body, coding, limit if stop_at is None else min(limit, stop_at),
                            stop_at is not None and stop_at < limit)
    return body


def _inflate(data: bytes, coding: str, limit: int, stopping: bool) -> bytes:
    view = memoryview(data)
    out: list[bytes] = []
    size = pos = 0
    for _ in range(MAX_MEMBERS):  # gzip: member after member (RFC 1952 2.2); deflate: one
        # 32 + MAX_WBITS reads a gzip or a zlib header, whichever it finds:
        # "deflate" is a zlib stream (RFC 9110 8.4.1.2), gzip a gzip one,
        # and a client that labels one as the other is still understood.
        inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)
        if coding == "deflate" and not _has_header(view[pos:pos + 2]):
            # No zlib header: raw deflate, as some clients send "deflate"
            # (RFC 9110 8.4.1.2 notes them).
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        pending = b""
        try:
            while not inflater.eof:
                if not pending and pos < len(view):  # a window at a time: what a
                    pending = view[pos:pos + _WINDOW]  # member leaves over is short
                    pos += len(pending)
                # With no input left, what the inflater still holds comes out.
                piece = inflater.decompress(pending, min(_PIECE, limit + 1 - size))
                pending = inflater.unconsumed_tail
                if not piece and not pending and pos == len(view):
                    break  # all of it read, and no end in it
                size += len(piece)
                if size > limit:
                    if stopping:
                        raise Longer
                    raise TooLarge(f"the request body inflates ({coding}) to more than "
                                   f"the maximum of {limit} bytes")
                out.append(piece)
        except zlib.error as e:
            raise BadRequest(f"the request body is not valid {coding}: {e}") from None
        if not inflater.eof:
            raise BadRequest(f"the request body ends inside its {coding} stream")
        pos -= len(inflater.unused_data)
        # Zeros after a gzip stream are padding, as gzip(1) reads them.
        if pos == len(view) or (view[pos] == 0 and not view[pos:].tobytes().strip(b"\0")):
            return b"".join(out)
        if coding == "deflate":
            raise BadRequest(f"{len(view) - pos} bytes follow the request body's deflate "
                             f"stream")
    raise BadRequest(f"the request body holds more than {MAX_MEMBERS} gzip members")


def _has_header(head: memoryview) -> bool:
    """Whether `head`, a body's first two bytes, is a gzip or a zlib
    header (RFC 1952, 1950); a shorter one is taken as one."""
    if len(head) < 2:
        return True
    return head == b"\x1f\x8b" or (head[0] & 0x0F == 8
                                    and int.from_bytes(head, "big") % 31 == 0)
