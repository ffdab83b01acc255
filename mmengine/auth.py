"""Tokens: who may control the engine, and who may run a model.

A token is any string a client presents (TCP: the frame's `token` key;
HTTP: `Authorization: Bearer <token>`). The server keeps only sha256
digests of the tokens it accepts: a model's manifest lists the digests of
its tokens (`token_sha256`), and the control token of the configuration is
hashed once at start. A presented token is hashed and compared with every
accepted digest in constant time, so neither a wrong token's length nor how
many of its bytes match shows in the time an answer takes.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

from mmengine.errors import Unauthorized


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def check(accepted: tuple[bytes, ...], token: object, what: str) -> None:
    """Unauthorized unless `token` is one of the tokens whose digests are
    `accepted`; an empty `accepted` lets everyone through."""
    if not accepted:
        return
    if not isinstance(token, str) or not token:
        raise Unauthorized(f"{what} needs a token")
    presented = digest(token)
    ok = False
    for d in accepted:  # no early exit: every digest is compared
        ok |= hmac.compare_digest(presented, d)
    if not ok:
        raise Unauthorized(f"{what}: the token is not valid")


def new_token() -> tuple[str, str]:
    """A fresh random token and the hex digest a manifest lists for it."""
    token = secrets.token_urlsafe(32)
    return token, digest(token).hex()
