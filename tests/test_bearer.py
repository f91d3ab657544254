"""What a bearer call's failures mean for a destructive call, over real loopback sockets:
certainly not sent (no connection was made) or in doubt (the request may have arrived)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import requests

from shared.adapters.bearer import bearer_request
from shared.domain.errors import ConnectionFailed, NoResponse


@contextmanager
def server(handle: Callable[[socket.socket], None]) -> Iterator[str]:
    """A loopback TCP server that does `handle` with each connection it accepts."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                handle(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/api/machines/m1/offboard"
    finally:
        done.set()
        thread.join()
        listener.close()


def read_request(connection: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(4096)
    return data


def call(url: str) -> requests.Response:
    with requests.Session() as session:
        return bearer_request(session, "POST", url, "token-value", (1.0, 0.5), json={"Comment": "x"})


def test_a_refused_connection_certainly_sent_nothing() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
    with pytest.raises(ConnectionFailed):
        call(f"http://127.0.0.1:{port}/api/machines/m1/offboard")


def test_a_connection_closed_after_the_request_arrived_is_in_doubt() -> None:
    received: list[bytes] = []
    with (
        server(lambda connection: received.append(read_request(connection))) as url,
        pytest.raises(NoResponse, match="Connection aborted"),
    ):
        call(url)
    assert received and received[0].startswith(b"POST /api/machines/m1/offboard")


def test_no_answer_within_the_read_timeout_is_in_doubt() -> None:
    def silent(connection: socket.socket) -> None:
        read_request(connection)
        threading.Event().wait(1.0)

    with server(silent) as url, pytest.raises(NoResponse, match=r"no answer within 0\.5s"):
        call(url)


def test_a_redirect_is_answered_not_followed() -> None:
    def redirect(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:9/\r\nContent-Length: 0\r\n\r\n"
        )

    with server(redirect) as url:
        assert call(url).status_code == 307
