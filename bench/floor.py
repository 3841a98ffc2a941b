"""The floor: the least a Twisted relay can do between pgbench and PostgreSQL.

One server connection per client (no pooling, no login of its own, no parsing): bytes
from the client go to PostgreSQL and back exactly as they come, through Twisted's own
``transport.write``, with TCP_NODELAY on both sides. What Odissey spends beyond this is
what its pooling, parsing and bookkeeping cost; what this spends is Twisted's (and the
interpreter's) price for moving the bytes at all. Run it with CPython and with PyPy:

    python bench/floor.py LISTEN_PORT PG_HOST PG_PORT

It prints ``listening on LISTEN_PORT`` once it accepts connections.
"""

from __future__ import annotations

import socket
import sys
from typing import List, Optional

from twisted.internet import protocol, reactor


def nodelay(transport: object) -> None:
    transport.getHandle().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]


class ServerSide(protocol.Protocol):
    def __init__(self, client: "ClientSide") -> None:
        self.client = client

    def connectionMade(self) -> None:
        nodelay(self.transport)
        self.client.attach(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)  # type: ignore[union-attr]

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
            server.transport.write(b"".join(self.early))  # type: ignore[union-attr]
            self.early = []

    def dataReceived(self, data: bytes) -> None:
        if self.server is not None:
            self.server.transport.write(data)  # type: ignore[union-attr]
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
    listen_port, pg_host, pg_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    reactor.listenTCP(listen_port, ClientFactory(pg_host, pg_port), backlog=1024, interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"listening on {listen_port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
