"""The HTTP connections: uvicorn's h11 protocol with two guards against slow and greedy clients.

A connection must send a complete request head within the header timeout of opening, or of the end
of its previous response; otherwise it is closed (a half-open connection, or headers that trickle in).
A connection opened beyond the connection limit is answered 503 (OpenAI's error body) on its first
request and closed. The size of a request head is h11's limit (16 KiB; beyond it, 400). The body is the
middleware's (``middleware.LimitBody``: its size and its own timeout).
"""

from __future__ import annotations

import asyncio
import functools
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from mesh_transformer.serving.errors import error_response

log = logging.getLogger(__name__)


class GuardedH11Protocol(H11Protocol):
    """One connection: closed without a whole request head in time; refused beyond the limit."""

    def __init__(self, *args, header_timeout_s: float, max_connections: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s, self.max_connections = header_timeout_s, max_connections
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("more than %d connections are open (--max-connections): answering a new one 503",
                        self.max_connections)
            self.app = functools.partial(_refuse_connection, self.max_connections)
        self._await_request_head()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a whole request head has arrived
            self._stop_header_timer()

    def on_response_complete(self) -> None:
        # Armed first: the base class may go straight on to a pipelined request, whose head disarms it.
        self._await_request_head()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _await_request_head(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.debug("closing a connection that sent no complete request head in %g s", self.header_timeout_s)
            self.conn.send(h11.ConnectionClosed())
            self.transport.close()


def guarded_protocol(header_timeout_s: float, max_connections: int) -> functools.partial:
    """What uvicorn's ``Config(http=...)`` builds each connection's protocol with."""
    return functools.partial(GuardedH11Protocol, header_timeout_s=header_timeout_s, max_connections=max_connections)


async def _refuse_connection(limit: int, scope, receive, send) -> None:
    response = error_response(503, f"the server has {limit} open connections, its limit; retry later",
                              kind="server_error", headers={"Connection": "close", "Retry-After": "1"})
    await response(scope, receive, send)
