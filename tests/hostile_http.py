"""Tiny HTTP servers that misbehave on purpose, on real sockets on loopback.

The sandbox keeps the contract; these do what no well-behaved server does: trickle an
answer a byte at a time, send far more than anyone should read, echo the API key back in
the status line. Each counts what it sent and notices when the client hangs up, so a
test can tell that the client gave up early without timing anything.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class RawRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Conversation:
    """What the server did on one connection."""

    request: RawRequest | None = None
    sent: int = 0  # bytes the handler managed to send
    hung_up: bool = False  # the client closed the connection before the handler was done
    finished: threading.Event = field(default_factory=threading.Event)

    def send(self, conn: socket.socket, data: bytes) -> bool:
        """Send ``data``; False (and ``hung_up``) once the client has closed."""
        try:
            conn.sendall(data)
        except OSError:
            self.hung_up = True
            return False
        self.sent += len(data)
        return True


Handler = Callable[[socket.socket, RawRequest, Conversation], None]


class RawServer:
    """Accepts connections on 127.0.0.1; each request goes to ``handler`` on its own
    thread, which writes whatever bytes it likes; the connection is closed after it."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.conversations: list[Conversation] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}/api"

    def __enter__(self) -> RawServer:
        self._accepting.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=30)

    def wait_finished(self, timeout: float = 60) -> None:
        """Wait until every handler so far has returned (the client hung up, or all sent)."""
        for conversation in list(self.conversations):
            conversation.finished.wait(timeout)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conversation = Conversation()
            self.conversations.append(conversation)
            thread = threading.Thread(target=self._serve, args=(conn, conversation), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, conversation: Conversation) -> None:
        conn.settimeout(30)  # a test gone wrong must not hang here for ever
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            request = _read_request(conn)
            if request is not None:
                conversation.request = request
                self.handler(conn, request, conversation)
        except OSError:
            conversation.hung_up = True
        finally:
            conversation.finished.set()
            conn.close()


def _read_request(conn: socket.socket) -> RawRequest | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, _version = request_line.split(" ", 2)
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return RawRequest(method, target, headers, body)


def response_head(
    status: int,
    reason: str = "OK",
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def trickling(total: int, interval: float, *, in_headers: bool) -> Handler:
    """A slow loris: ``total`` bytes one at a time, ``interval`` seconds apart, either
    inside a header (the status line arrives, the headers never end) or as the body of
    an answer whose headers arrived at once."""

    def handle(conn: socket.socket, request: RawRequest, talk: Conversation) -> None:
        if in_headers:
            start = b"HTTP/1.1 200 OK\r\nX-Slow: "
        else:
            start = response_head(200, headers={"Content-Length": str(total)})
        if not talk.send(conn, start):
            return
        talk.sent = 0  # count only the trickled bytes
        for _ in range(total):
            if not talk.send(conn, b"a"):
                return
            time.sleep(interval)

    return handle


def flooding(total: int, *, chunked: bool) -> Handler:
    """A 200 whose body is ``total`` bytes (announced, or chunked without a length),
    sent as fast as the client takes it."""
    block = b"a" * 65536

    def handle(conn: socket.socket, request: RawRequest, talk: Conversation) -> None:
        if chunked:
            head = response_head(200, headers={"Transfer-Encoding": "chunked"})
        else:
            head = response_head(200, headers={"Content-Length": str(total)})
        if not talk.send(conn, head):
            return
        talk.sent = 0  # count only the body
        left = total
        while left > 0:
            part = block[: min(left, len(block))]
            data = b"%x\r\n%s\r\n" % (len(part), part) if chunked else part
            if not talk.send(conn, data):
                return
            left -= len(part)
        if chunked:
            talk.send(conn, b"0\r\n\r\n")

    return handle
