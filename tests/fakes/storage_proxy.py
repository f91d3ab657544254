"""A loopback HTTP proxy in front of Azurite that can hold one request: the test names it by
a piece of its URL or body, the proxy tells the test when it arrived and keeps it (never
forwarding it), and the test kills the process that sent it. So a process can be killed at
an exact step of its work, with every storage write before that step done and none after.

Plain HTTP/1.1 with Content-Length, which is what the Azure SDKs send to Azurite.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field


@dataclass
class Hold:
    """Hold the first request whose method, path and body contain all of `needles`."""

    needles: tuple[bytes, ...]
    arrived: threading.Event = field(default_factory=threading.Event)
    after_forwarding: bool = False  # forward it and its answer, then report it arrived


class StorageProxy:
    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self.hold: Hold | None = None
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self._target))
        try:
            while True:
                request = _read_message(client)
                if request is None:
                    return
                hold = self._claim(request)
                if hold is not None and not hold.after_forwarding:
                    hold.arrived.set()
                    threading.Event().wait()  # held until the sender is killed
                upstream.sendall(request)
                reply = _read_message(upstream)
                if reply is None:
                    return
                client.sendall(reply)
                if hold is not None:
                    hold.arrived.set()
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def _claim(self, request: bytes) -> Hold | None:
        with self._lock:
            hold = self.hold
            if hold is not None and all(needle in request for needle in hold.needles):
                self.hold = None
                return hold
        return None


def _read_message(sock: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head + b"\r\n\r\n" + body
