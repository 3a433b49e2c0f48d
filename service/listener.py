"""The listening socket several workers share (``service.workers``), and how it is closed without
resetting a connection.

The supervisor binds it; every worker accepts from it (one accept queue: whichever worker is free takes
the next connection, and a connection never waits in a queue that only a dead worker would read). A
listening socket is closed when its last holder closes it, and the kernel then resets every connection
still in its accept queue: handshakes it completed for a client that no worker accepted. So a shutdown
first stops new handshakes (``stop_handshakes``: a socket filter drops new SYNs, which clients send
again a second later and then find the port closed: refused, not reset), then waits until the workers
have accepted everything already queued (``wait_accepted``), and only then closes the socket.

Both are Linux facilities (a classic BPF socket filter, and ``TCP_INFO``, which gives a listening
socket's accept queue length); elsewhere they do nothing and say so (False / None), and the socket is
closed at once, as uvicorn does.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys
import time

SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>; the socket module does not export it
_TCP_INFO_UNACKED = 24  # offset of tcpi_unacked (a listener's accept queue length) in struct tcp_info
# Classic BPF run on each packet for the socket, at its TCP header: ldb [13] (the flags); and #0x12
# (SYN|ACK); jeq #0x02 -> ret 0 (drop: a new connection's first SYN); else ret 0xffffffff (keep whole).
# Handshakes already under way (their ACK), and the connections accepted from here on (which inherit
# the filter), are untouched.
_DROP_NEW_SYN = (
    (0x30, 0, 0, 13),
    (0x54, 0, 0, 0x12),
    (0x15, 0, 1, 0x02),
    (0x06, 0, 0, 0),
    (0x06, 0, 0, 0xFFFFFFFF),
)


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` as uvicorn binds it (``SO_REUSEADDR``); each worker's server
    makes it listen (``loop.create_server(sock=...)``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def stop_handshakes(sock: socket.socket) -> bool:
    """From now on, new connections to ``sock`` are not answered (their SYN is dropped; the client sends
    it again after about a second). For every process holding the socket. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    code = b"".join(struct.pack("HBBI", *instruction) for instruction in _DROP_NEW_SYN)
    program = ctypes.create_string_buffer(code)
    fprog = struct.pack("HP", len(_DROP_NEW_SYN), ctypes.addressof(program))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


def accept_queue(sock: socket.socket) -> int | None:
    """Connections the kernel completed on listening ``sock`` that no process has accepted yet (None
    where unknown)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    return struct.unpack_from("I", info, _TCP_INFO_UNACKED)[0] if len(info) >= 28 else None


def wait_accepted(sock: socket.socket, quiet_s: float = 0.2, limit_s: float = 2.0) -> bool:
    """Until ``sock``'s accept queue has stayed empty for ``quiet_s`` (a handshake under way when the
    SYNs stopped completes within its round trip, and joins the queue), at most ``limit_s``. True if it
    did; False if the queue was still not empty (or cannot be read)."""
    deadline = time.monotonic() + limit_s
    empty_since: float | None = None
    while (now := time.monotonic()) < deadline:
        queued = accept_queue(sock)
        if queued is None:
            return False
        if queued:
            empty_since = None
        elif empty_since is None:
            empty_since = now
        elif now - empty_since >= quiet_s:
            return True
        time.sleep(0.01)
    return False
