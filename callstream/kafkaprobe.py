"""Asking a local port whether it is free, and a broker whether it is ours and ready: a raw
Kafka Metadata request over a plain socket, so no event loop is needed."""

from __future__ import annotations

import socket
import struct

from callstream import ports

_HOST = "127.0.0.1"


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Java binds with SO_REUSEADDR, so TIME_WAIT leftovers from the previous run do not
        # block it; mirror that or a just-stopped broker's port would look busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def free_port(avoid: int | None = None) -> int:
    while (port := ports.free_port()) == avoid:
        pass
    return port


def broker_ready(port: int, cluster_id: str, node_id: int, timeout: float) -> bool:
    """True once the broker answers Metadata with our cluster id and itself among the brokers.

    An open port is not enough: the listener accepts connections before the broker has
    registered with the controller, and a broker from another home could own the port. A raw
    Metadata v4 request (the oldest version Kafka 4 still serves) avoids needing an event loop,
    so this also works when called from inside one via a thread.
    """
    client_id = b"callstream-localkafka"
    correlation_id = 1
    body = struct.pack(">hhih", 3, 4, correlation_id, len(client_id)) + client_id
    body += struct.pack(">i?", 0, False)  # no topics, no auto-creation
    try:
        with (
            socket.create_connection((_HOST, port), timeout=timeout) as sock,
            sock.makefile("rb") as answer,
        ):
            sock.sendall(struct.pack(">i", len(body)) + body)
            (size,) = struct.unpack(">i", answer.read(4))
            resp = answer.read(size)
        # A buffered read stops short only at the end of the stream: the broker hung up.
        return len(resp) == size and _metadata_lists_broker(
            resp, correlation_id, cluster_id, node_id, port
        )
    # ValueError: a name that is not UTF-8.
    except (OSError, struct.error, IndexError, ValueError):
        return False


def _metadata_lists_broker(
    resp: bytes, correlation_id: int, cluster_id: str, node_id: int, port: int
) -> bool:
    corr, _throttle, n_brokers = struct.unpack_from(">iii", resp, 0)
    if corr != correlation_id:
        return False
    pos = 12
    found = False

    def read_str() -> str | None:
        nonlocal pos
        (length,) = struct.unpack_from(">h", resp, pos)
        pos += 2
        if length < 0:
            return None
        value = resp[pos : pos + length].decode()
        pos += length
        return value

    for _ in range(n_brokers):
        (bid,) = struct.unpack_from(">i", resp, pos)
        pos += 4
        read_str()  # host
        pos += 4  # port: not compared, advertised.listeners may name a proxy in front of us
        read_str()  # rack
        found = found or bid == node_id
    return found and read_str() == cluster_id
