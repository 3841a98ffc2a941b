"""The floor: the least a Twisted relay can do between pgbench and PostgreSQL.

One server connection per client (no pooling, no login of its own, no parsing): bytes
from the client go to PostgreSQL and back exactly as they come, with TCP_NODELAY on both
sides. What Odissey spends beyond this is what its pooling, parsing and bookkeeping cost;
what this spends is Twisted's (and the interpreter's) price for moving the bytes at all.

Each write goes straight to the socket when Twisted has nothing queued for it, as
Odissey's own writes do (``odissey.flow.send``): Twisted's ``transport.write`` would
register the socket for writability and send on the next reactor turn, a cost Odissey
does not pay, and a floor that paid it would not be a floor. ``--twisted-write`` measures
that plain ``transport.write`` relay instead. ``--short-reads`` reads with Odissey's own
read path (``odissey/reading.py``, the checkout this file is in) instead of Twisted's
``doRead``: what Twisted's reactor and transports cost around reads Odissey does not make
through them, so that Odissey's own work is what stays between this floor and Odissey.
Under PyPy it runs with Odissey's JIT parameters (``odissey/pypy.py``), as with its GC
nursery (``bench/common.py``). Run it with CPython and with PyPy:

    python bench/floor.py LISTEN_PORT PG_HOST PG_PORT [--twisted-write] [--short-reads]

It prints ``listening on LISTEN_PORT`` once it accepts connections.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import List, Optional

from twisted.internet import protocol, reactor


def send(transport: object, data: bytes) -> None:
    """``transport.write``, but ``send()`` at once when nothing is queued ahead."""
    if not (transport._tempDataLen or transport.dataBuffer or transport.disconnecting):  # type: ignore[attr-defined]
        sent = transport.writeSomeData(data)  # type: ignore[attr-defined]
        if type(sent) is int:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)  # type: ignore[attr-defined]


def twisted_write(transport: object, data: bytes) -> None:
    transport.write(data)  # type: ignore[attr-defined]


write = send


def nodelay(transport: object) -> None:
    transport.getHandle().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]


class ServerSide(protocol.Protocol):
    def __init__(self, client: "ClientSide") -> None:
        self.client = client

    def connectionMade(self) -> None:
        nodelay(self.transport)
        self.client.attach(self)

    def dataReceived(self, data: bytes) -> None:
        write(self.client.transport, data)

    def connectionLost(self, reason: object = None) -> None:
        self.client.transport.loseConnection()  # type: ignore[union-attr]


class ServerFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, client: "ClientSide") -> None:
        self.client = client

    def buildProtocol(self, addr: object) -> ServerSide:
        return ServerSide(self.client)

    def clientConnectionFailed(self, connector: object, reason: object) -> None:
        self.client.transport.loseConnection()  # type: ignore[union-attr]


class ClientSide(protocol.Protocol):
    def __init__(self, pg_host: str, pg_port: int) -> None:
        self.pg = (pg_host, pg_port)
        self.server: Optional[ServerSide] = None
        self.early: List[bytes] = []  # what the client sent before PostgreSQL answered

    def connectionMade(self) -> None:
        nodelay(self.transport)
        reactor.connectTCP(self.pg[0], self.pg[1], ServerFactory(self))  # type: ignore[attr-defined]

    def attach(self, server: ServerSide) -> None:
        self.server = server
        if self.early:
            write(server.transport, b"".join(self.early))
            self.early = []

    def dataReceived(self, data: bytes) -> None:
        if self.server is not None:
            write(self.server.transport, data)
        else:
            self.early.append(data)

    def connectionLost(self, reason: object = None) -> None:
        if self.server is not None:
            self.server.transport.loseConnection()  # type: ignore[union-attr]


class ClientFactory(protocol.Factory):
    noisy = False

    def __init__(self, pg_host: str, pg_port: int) -> None:
        self.pg = (pg_host, pg_port)

    def buildProtocol(self, addr: object) -> ClientSide:
        return ClientSide(*self.pg)


def main() -> None:
    global write
    listen_port, pg_host, pg_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    if "--twisted-write" in sys.argv[4:]:
        write = twisted_write
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from odissey import pypy, reading

    pypy.compile_sooner()  # (under PyPy, the JIT parameters Odissey runs with)
    if "--short-reads" in sys.argv[4:]:
        reading.install(reactor, (ClientSide, ServerSide))
    reactor.listenTCP(listen_port, ClientFactory(pg_host, pg_port), backlog=1024, interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"listening on {listen_port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
