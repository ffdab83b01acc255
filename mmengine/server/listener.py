"""What the TCP and HTTP servers share: a listening socket on the engine's
loop, the connections it has open, the control token's digest, and a stop
that lets them finish."""
from __future__ import annotations

import asyncio
from typing import Callable

from mmengine import auth
from mmengine.engine import Engine


class Listener:
    """Each connection protocol it makes registers itself with `admit` and
    answers `pending()`: the futures of the requests it has in flight.

    At most `max_connections` are open at once (config `max_connections`);
    `admit` refuses the next, and the protocol answers it with its own
    OVERLOADED error and closes it at once, before reading anything.

    Control operations (loading, unloading, pinning) call `check_control`
    with the token the request carries. Reading operations (list, stats,
    health, metadata, /metrics, /ping) need no token: they change nothing,
    and health checks and metric scrapers must reach them without a secret."""

    def __init__(self, engine: Engine, factory: Callable[[], asyncio.Protocol],
                 max_connections: int | None = None):
        self.engine = engine
        self._factory = factory
        self._server: asyncio.AbstractServer | None = None
        self.connections: set = set()
        self.max_connections = max_connections or engine.config.max_connections
        self.refused = 0  # connections refused past max_connections
        # Hashed once: a request's token is compared with the digest only.
        token = engine.config.control_token
        self.control_digests: tuple[bytes, ...] = (auth.digest(token),) if token else ()

    def admit(self, connection) -> bool:
        """Registers a new connection; False (and not registered) when
        `max_connections` are open already."""
        if len(self.connections) >= self.max_connections:
            self.refused += 1
            return False
        self.connections.add(connection)
        return True

    def check_control(self, token: object) -> None:
        """Unauthorized unless `token` is the control token (if one is set)."""
        auth.check(self.control_digests, token, "control operations")

    async def start(self, host: str, port: int) -> int:
        """Listens; returns the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, host, port,
                                                reuse_address=True)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stops accepting, lets requests in flight finish (to the shutdown
        deadline), then closes every connection."""
        if self._server is None:
            return
        self._server.close()
        pending = [f for c in self.connections for f in c.pending()]
        if pending:
            await asyncio.wait(pending, timeout=self.engine.config.shutdown_timeout_s)
        for c in list(self.connections):
            c.transport.close()
        await self._server.wait_closed()
