"""The workers' shared listening socket (service/listener.py): once handshakes are stopped, a new
connection is not answered (its client retries, then finds the port closed: refused, never reset),
while the connections already queued stay there to be accepted and served; the accept queue is counted."""

from __future__ import annotations

import socket
import sys

import pytest
from service_testing import poll

from service.listener import accept_queue, bind_listener, stop_handshakes, wait_accepted

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux socket facilities")


def test_stopped_handshakes_keep_the_queued_connections():
    with bind_listener("127.0.0.1", 0) as sock:
        sock.listen(8)
        address = sock.getsockname()
        with socket.create_connection(address, timeout=5) as queued:
            queued.sendall(b"hello")
            poll(lambda: accept_queue(sock) == 1, 5, "the connection to be queued")
            assert stop_handshakes(sock)
            with socket.socket() as late:
                late.settimeout(0.3)
                with pytest.raises(TimeoutError):  # its SYN is dropped: not accepted, not refused
                    late.connect(address)
            assert accept_queue(sock) == 1
            accepted, _ = sock.accept()
            with accepted:
                assert accepted.recv(5) == b"hello"
                accepted.sendall(b"answer")
                assert queued.recv(6) == b"answer", "a queued connection is served as before"
        assert accept_queue(sock) == 0 and wait_accepted(sock, quiet_s=0.05)


def test_a_closed_listener_refuses():
    with bind_listener("127.0.0.1", 0) as sock:
        sock.listen(8)
        address = sock.getsockname()
        assert stop_handshakes(sock)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5)
