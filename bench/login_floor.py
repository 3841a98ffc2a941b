"""The login floor: the least a Twisted pooler can do for a login (what ``pgbench -C`` costs).

``bench/floor.py`` opens a PostgreSQL connection per client, so under ``-C`` it measures
PostgreSQL's fork, not a pooler. This one keeps its server connections: it answers each
client's login itself (``N`` to an SSLRequest, an md5 challenge it checks, then
AuthenticationOk, the server's ParameterStatus messages, BackendKeyData and
ReadyForQuery, all prepared once), hands the client an idle server connection (opening
one when none is idle), relays bytes both ways as they come, with TCP_NODELAY and
:func:`floor.send`, and takes the server back when the client's last chunk is a lone
Terminate and the server's last reply left it idle. Nothing else is parsed: no
transaction tracking, no reset, no timeouts, no logging, no limits. A session pooler at
its least, so that what Odissey spends on a login beyond this is its own work, and what
this spends is Twisted's (and the interpreter's) price for accepting, greeting and
closing a connection at all. It reads with Odissey's own read path
(``odissey/reading.py``: under PyPy, Twisted's ``recv`` of 64 KiB per read fills the
garbage collector's nursery in a few logins), as ``floor.py --short-reads`` does.

Kept servers keep what a session left on them (no ``DISCARD ALL``): pgbench's
``-M prepared`` statements would collide on the next client, so it serves only the
simple and extended protocols. Under PyPy it runs with Odissey's JIT parameters
(``odissey/pypy.py``) and GC nursery, as every PyPy process the benchmarks start. Run
it with CPython and with PyPy:

    python bench/login_floor.py LISTEN_PORT PG_HOST PG_PORT USER PASSWORD DATABASE

It prints ``listening on LISTEN_PORT`` once it accepts connections.
"""

from __future__ import annotations

import enum
import random
import struct
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from twisted.internet import protocol, reactor

try:  # the interpreter's own md5, as Odissey's (odissey/auth/secrets.py): not OpenSSL's through cffi under PyPy
    from _md5 import md5
except ImportError:
    from hashlib import md5

from floor import nodelay, send

SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST = 80877103, 80877104, 80877102
TERMINATE = b"X\x00\x00\x00\x04"
AUTH_OK = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
READY = b"Z\x00\x00\x00\x05I"


def md5_hex(data: bytes) -> bytes:
    return md5(data).hexdigest().encode()


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def error(text: str) -> bytes:
    return message(b"E", b"SFATAL\0C08006\0M" + text.encode() + b"\0\0")


class Pool:
    """Idle logged-in server connections, and the greeting clients get (their ParameterStatus)."""

    def __init__(self, host: str, port: int, user: bytes, password: bytes, database: bytes) -> None:
        self.address = (host, port)
        self.user, self.password, self.database = user, password, database
        self.stored = md5_hex(password + user)  # md5's stored form, as Odissey remembers it
        self.idle: List[ServerSide] = []
        self.parameters = b""  # the first server's ParameterStatus messages

    def take(self, ready: Callable[["ServerSide"], None], failed: Callable[[str], None]) -> None:
        """An idle server for ``ready``, or a new one; ``failed`` hears why none came."""
        if self.idle:
            ready(self.idle.pop())
            return
        factory = Opening(self, ready, failed)
        reactor.connectTCP(*self.address, factory)  # type: ignore[attr-defined]


class Opening(protocol.ClientFactory):
    noisy = False

    def __init__(self, pool: Pool, ready: Callable[["ServerSide"], None], failed: Callable[[str], None]) -> None:
        self.pool, self.ready, self.failed = pool, ready, failed

    def buildProtocol(self, addr: object) -> "ServerSide":
        return ServerSide(self.pool, self.ready, self.failed)

    def clientConnectionFailed(self, connector: object, reason: object) -> None:
        self.failed(f"could not connect to the server: {reason}")


class ServerSide(protocol.Protocol):
    def __init__(self, pool: Pool, ready: Callable[["ServerSide"], None], failed: Callable[[str], None]) -> None:
        self.pool, self.ready, self.failed = pool, ready, failed
        self.client: Optional[ClientSide] = None
        self.logging_in = True
        self.buffer = b""
        self.parameters = b""
        self.last = b""  # the last chunk it sent once logged in

    @property
    def idle(self) -> bool:
        """Its last reply ended with ReadyForQuery 'I' (a reply's last six bytes)."""
        return self.last.endswith(READY)

    def connectionMade(self) -> None:
        nodelay(self.transport)
        pool = self.pool
        body = struct.pack("!I", 196608) + b"user\0" + pool.user + b"\0database\0" + pool.database + b"\0\0"
        send(self.transport, struct.pack("!I", len(body) + 4) + body)

    def dataReceived(self, data: bytes) -> None:
        if not self.logging_in:
            self.last = data
            if self.client is not None:
                send(self.client.transport, data)
            return
        self.buffer += data
        while len(self.buffer) >= 5:
            kind = self.buffer[:1]
            length = struct.unpack_from("!I", self.buffer, 1)[0]
            if len(self.buffer) < 1 + length:
                return
            body, self.buffer = self.buffer[5:1 + length], self.buffer[1 + length:]
            if kind == b"R" and body[:4] == b"\x00\x00\x00\x05":
                answer = b"md5" + md5_hex(self.pool.stored + body[4:8])
                send(self.transport, message(b"p", answer + b"\0"))
            elif kind == b"S":
                self.parameters += message(kind, body)
            elif kind == b"Z":
                self.logging_in = False
                self.last = READY
                self.pool.parameters = self.pool.parameters or self.parameters
                self.ready(self)
            elif kind == b"E":
                self.failed(f"PostgreSQL refused the floor's login: {body!r}")
                self.transport.loseConnection()  # type: ignore[union-attr]
                return

    def connectionLost(self, reason: object = None) -> None:
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        elif self.logging_in:
            self.failed(f"the server closed during the floor's login: {reason}")
        if self.client is not None:
            self.client.transport.loseConnection()  # type: ignore[union-attr]


class State(enum.Enum):
    STARTUP = "startup"  # waiting for the startup packet (or an SSLRequest)
    PASSWORD = "password"  # the md5 challenge sent, waiting for the answer
    WAITING = "waiting"  # logged in, waiting for a server
    ATTACHED = "attached"  # relaying to and from its server
    GONE = "gone"


class ClientSide(protocol.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.state = State.STARTUP
        self.server: Optional[ServerSide] = None
        self.user = b""
        self.salt = b""
        self.buffer = b""

    def connectionMade(self) -> None:
        nodelay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.ATTACHED:
            server = self.server
            assert server is not None
            if data == TERMINATE and server.idle:  # the session ended idle: the server goes back
                server.client, self.server = None, None
                self.state = State.GONE
                self.pool.idle.append(server)
                self.transport.loseConnection()  # type: ignore[union-attr]
            else:
                send(server.transport, data)
            return
        self.buffer += data
        if self.state is State.STARTUP:
            self._startup()
        elif self.state is State.PASSWORD:
            self._password()

    def _startup(self) -> None:
        if len(self.buffer) < 8 or len(self.buffer) < struct.unpack_from("!I", self.buffer)[0]:
            return
        length, code = struct.unpack_from("!II", self.buffer)
        startup, self.buffer = self.buffer[8:length], self.buffer[length:]
        if code in (SSL_REQUEST, GSSENC_REQUEST):
            send(self.transport, b"N")
            return
        if code == CANCEL_REQUEST:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        fields = startup.split(b"\0")
        params: Dict[bytes, bytes] = dict(zip(fields[::2], fields[1::2]))
        self.user = params.get(b"user", b"")
        self.salt = random.getrandbits(32).to_bytes(4, "big")
        self.state = State.PASSWORD
        send(self.transport, b"R\x00\x00\x00\x0c\x00\x00\x00\x05" + self.salt)

    def _password(self) -> None:
        if len(self.buffer) < 5 or len(self.buffer) < 1 + struct.unpack_from("!I", self.buffer, 1)[0]:
            return  # the password message is not whole yet
        length = struct.unpack_from("!I", self.buffer, 1)[0]
        answer, self.buffer = self.buffer[5:length], self.buffer[1 + length:]
        pool = self.pool
        if self.user != pool.user or answer != b"md5" + md5_hex(pool.stored + self.salt):
            self.refuse("password authentication failed")
            return
        self.state = State.WAITING
        pool.take(self.attach, self.refuse)

    def refuse(self, why: str) -> None:
        if self.state is not State.GONE:
            self.state = State.GONE
            send(self.transport, error(why))
            self.transport.loseConnection()  # type: ignore[union-attr]

    def attach(self, server: ServerSide) -> None:
        if self.state is not State.WAITING:  # gone meanwhile
            self.pool.idle.append(server)
            return
        self.state = State.ATTACHED
        self.server, server.client = server, self
        key = message(b"K", struct.pack("!II", id(self) & 0x7FFFFFFF, 0))
        send(self.transport, AUTH_OK + self.pool.parameters + key + READY)
        if self.buffer:
            send(server.transport, self.buffer)
            self.buffer = b""

    def connectionLost(self, reason: object = None) -> None:
        self.state = State.GONE
        if self.server is not None:  # gone mid-session: the server's state is unknown
            self.server.client = None
            self.server.transport.loseConnection()  # type: ignore[union-attr]


class ClientFactory(protocol.Factory):
    noisy = False

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def buildProtocol(self, addr: object) -> ClientSide:
        return ClientSide(self.pool)


def main() -> None:
    listen_port, pg_host, pg_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    user, password, database = (arg.encode() for arg in sys.argv[4:7])
    pool = Pool(pg_host, pg_port, user, password, database)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from odissey import pypy, reading

    pypy.compile_sooner()  # (under PyPy, the JIT parameters Odissey runs with)

    reading.install(reactor, (ClientSide, ServerSide))
    reactor.listenTCP(listen_port, ClientFactory(pool), backlog=1024, interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"listening on {listen_port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
