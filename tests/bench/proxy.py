"""A delaying TCP proxy: a loopback stand-in for a network with latency.

    python -m tests.bench.proxy --delay-ms 10 TARGET_PORT [TARGET_PORT ...]

Listens on one free loopback port per target and prints ``ready P1 P2 ...`` (in the
order of the targets), then forwards until SIGTERM. Every chunk read from one side is
written to the other ``delay`` after it arrived, in order, in both directions, so a
request/response round trip costs 2 × delay more (this kernel has no netem). With
``--delay-ms 0`` chunks are forwarded at once: that measures the proxy's own cost.

It runs in its own process (the bench and the client must not share its GIL) and is as
cheap as Python gets: one asyncio loop for all connections, protocol callbacks instead of
streams, no task or queue per chunk, one timer per direction at a time, chunks that fall
due together written with one ``write``. Backpressure: when one side's send buffer fills
up, the other side stops being read.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import sys


class _Side(asyncio.Protocol):
    """One socket of a proxied connection; ``peer`` is the other one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        # Chunks waiting to be written to *this* side: (due, data); b"" means EOF.
        self.pending: collections.deque[tuple[float, bytes]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.eof_sent = False
        self.got_eof = False

    # --- reading from this side, forwarding to the peer --------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.send(data)

    def eof_received(self) -> bool:
        self.got_eof = True
        if self.peer is not None:
            self.peer.send(b"")
        return True  # keep the write half open: the peer may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pending.clear()
        if self.peer is not None and not self.got_eof:
            self.got_eof = True
            self.peer.send(b"")

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    # --- writing to this side ------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.delay == 0 and not self.pending:
            self._write(data)
            return
        due = self.loop.time() + self.delay
        self.pending.append((due, data))
        if self.timer is None:
            self.timer = self.loop.call_at(due, self._flush)

    def _flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        chunks: list[bytes] = []
        while self.pending and self.pending[0][0] <= now:
            data = self.pending.popleft()[1]
            if not data:
                self._write(b"".join(chunks))
                chunks = []
                self._write(b"")
                continue
            chunks.append(data)
        if chunks:
            self._write(b"".join(chunks))
        if self.pending:
            self.timer = self.loop.call_at(self.pending[0][0], self._flush)

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if data:
            transport.write(data)
            return
        self.eof_sent = True
        if self.peer is not None and self.peer.eof_sent:
            # Both directions are finished: let the buffered bytes go, then close both.
            transport.close()
            if self.peer.transport is not None:
                self.peer.transport.close()
        elif transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()


class _Client(_Side):
    """The accepted side: opens the connection to the target, reading paused until then."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, target: int) -> None:
        super().__init__(loop, delay)
        self.target = target

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        try:
            _, server = await self.loop.create_connection(
                lambda: _Side(self.loop, self.delay), "127.0.0.1", self.target
            )
        except OSError:
            self.transport.close()
            return
        server.peer, self.peer = self, server
        if self.got_eof:
            server.send(b"")
        elif not self.transport.is_closing():
            self.transport.resume_reading()


async def serve(targets: list[int], delay_ms: float) -> None:
    loop = asyncio.get_running_loop()
    delay = delay_ms / 1000
    servers = []
    for target in targets:

        def factory(target: int = target) -> _Client:
            return _Client(loop, delay, target)

        servers.append(await loop.create_server(factory, "127.0.0.1", 0, backlog=128))
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    print("ready", *ports, flush=True)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    loop.add_signal_handler(signal.SIGINT, stop.set_result, None)
    await stop
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.proxy", description=__doc__)
    parser.add_argument("--delay-ms", type=float, required=True, help="added each way")
    parser.add_argument("targets", type=int, nargs="+", help="loopback ports to forward to")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.targets, args.delay_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
