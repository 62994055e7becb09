"""How both servers run under uvicorn: h11 with a deadline on every request's header block.

uvicorn closes an idle keep-alive connection after a few seconds, but any byte resets that timer, and a new
connection has none until its first request is complete: a client that sends a header byte every few seconds held a
connection (and its buffers) for as long as it liked. Here the header block must be complete within
`header_timeout_s` of the connection being ready for a request; the body's deadline is the body-limit middleware's.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.common.limits import HeaderLimits


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the header deadline; `header_timeout_s` is set by `protocol_for`."""

    header_timeout_s: float = HeaderLimits.header_timeout_s

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        if not self.transport.is_closing():
            self.loop.call_later(self.header_timeout_s, self._header_deadline, self.cycle)

    def _header_deadline(self, cycle_then: object) -> None:
        """Close the connection if it is still waiting for the same request's header block (no request began)."""
        if self.cycle is cycle_then and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def protocol_for(limits: HeaderLimits) -> type[TimedH11Protocol]:
    """The protocol class uvicorn builds per connection, with this server's header deadline."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout_s": limits.header_timeout_s})
