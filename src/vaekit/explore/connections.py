"""The explorer's HTTP connections: timeouts, and a cap per client that idle sockets cannot fill.

uvicorn's own `limit_concurrency` counts open connections, so 70 sockets that connect and send
nothing would make every real request a 503 until they leave, which they need never do (uvicorn
has no timeout on request headers, and a byte now and then keeps its keep-alive timer off). This
protocol is uvicorn's h11 one with:

- a header timeout: a connection must deliver a complete request head within HEADER_TIMEOUT
  seconds of connecting (or of its previous response), else it is closed;
- a body timeout: once the head is in, the body must be complete within BODY_TIMEOUT seconds,
  else the client gets 408 and the connection is closed (a chunked body that never ends is cut
  off here, or at the body-size limit of the app's Guard, whichever comes first);
- a cap of MAX_PER_CLIENT connections per client address and MAX_CONNECTIONS in all. When a
  new connection would pass a cap, the oldest *idle* connection (no request in progress: only
  connected, or sending a request head) is closed to make room; only when every connection is
  busy with a request is the new one refused. So idle or half-open sockets can never crowd out
  a real request, and a client cannot hold more than MAX_PER_CLIENT requests at once.
"""

from __future__ import annotations

import asyncio
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0  # seconds to send a request head (a browser sends it in one packet)
BODY_TIMEOUT = 30.0  # seconds to send a body of at most the upload limit (4 MiB)
MAX_PER_CLIENT = 32  # a browser opens 6 per host; the rest is room for scripts
MAX_CONNECTIONS = 256

_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s")


def limited_protocol(header_timeout: float = HEADER_TIMEOUT, body_timeout: float = BODY_TIMEOUT,
                     max_per_client: int = MAX_PER_CLIENT,
                     max_connections: int = MAX_CONNECTIONS) -> type:
    """An H11Protocol class with these limits (uvicorn.Config(http=...) takes the class)."""

    class LimitedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.opened = time.monotonic()
            self.timer: asyncio.TimerHandle | None = None
            self._arm(header_timeout, self._header_timed_out)
            self._make_room()

        # --- state ------------------------------------------------------------------------
        @property
        def busy(self) -> bool:
            """A request head has arrived and its response is not complete."""
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self, delay: float, callback) -> None:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_later(delay, callback)

        def _close(self) -> None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if not self.transport.is_closing():
                self.transport.close()

        # --- caps -------------------------------------------------------------------------
        def _make_room(self) -> None:
            host = self.client[0] if self.client else None
            mine = [c for c in self.connections if getattr(c, "client", None)
                    and c.client[0] == host and c is not self]
            for group, cap in ((mine, max_per_client - 1), (
                    [c for c in self.connections if c is not self], max_connections - 1)):
                open_ones = [c for c in group if not c.transport.is_closing()]
                excess = len(open_ones) - cap
                if excess <= 0:
                    continue
                idle = sorted((c for c in open_ones if not getattr(c, "busy", False)),
                              key=lambda c: getattr(c, "opened", 0.0))
                for connection in idle[:excess]:
                    getattr(connection, "_close", connection.transport.close)()
                if len(idle) < excess:  # every other connection is serving a request
                    self._close()
                    return

        # --- timeouts ---------------------------------------------------------------------
        def handle_events(self) -> None:
            was_busy = self.busy
            super().handle_events()
            if self.busy and not was_busy:  # a request head arrived
                if self.cycle.more_body:
                    self._arm(body_timeout, self._body_timed_out)
                elif self.timer is not None:
                    self.timer.cancel()
                    self.timer = None
            elif self.busy and not self.cycle.more_body and self.timer is not None:
                self.timer.cancel()  # the body is complete
                self.timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self.busy:
                self._arm(header_timeout, self._header_timed_out)  # the next request's head

        def _header_timed_out(self) -> None:
            self.timer = None
            if not self.busy:
                self._close()

        def _body_timed_out(self) -> None:
            self.timer = None
            if self.busy and self.cycle.more_body:
                if not self.cycle.response_started:
                    detail = (b'{"detail":"the request body did not arrive within %d seconds; '
                              b'send it at once"}' % int(body_timeout))
                    self.transport.write(_TIMEOUT_RESPONSE % (len(detail), detail))
                    self.cycle.response_started = True
                self.cycle.disconnected = True
                self.cycle.message_event.set()  # the app's receive() sees the disconnect
                self._close()

        def connection_lost(self, exc) -> None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            super().connection_lost(exc)

    return LimitedH11Protocol
