"""A TCP forwarder in front of a c10d ``TCPStore`` that counts every client's requests and bytes.

Ranks connect to the proxy's port instead of the store's (``MASTER_PORT``, with
``TORCHELASTIC_USE_AGENT_STORE=True`` so that no rank hosts the store: every rank is a client, as
under torchrun's agent). Each request a client sends is parsed from its wire format (a query type
byte, then strings and byte strings as a uint64 length and the data), so requests are counted
exactly, not guessed from reads; ``get`` is two requests on the wire (torch sends a wait, then the
get). A type the parser does not know stops the parsing of that connection (its bytes are still
counted) and is recorded, so a count is never silently wrong.
"""
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

# torch's TCPStore query types, in wire order (torch/csrc/distributed/c10d/TCPStoreBackend.hpp),
# with the arguments each carries: s a string, b a byte string, q an int64, n a count of strings,
# p a count of (string, byte string) pairs, u a uint32
QUERIES: List[Tuple[str, str]] = [
    ('validate', 'u'), ('set', 'sb'), ('compare_set', 'sbb'), ('get', 's'), ('add', 'sq'),
    ('check', 'n'), ('wait', 'n'), ('num_keys', ''), ('delete_key', 's'), ('append', 'sb'),
    ('multi_get', 'n'), ('multi_set', 'p'), ('cancel_wait', ''), ('ping', 'u')]


@dataclass
class Request:
    time: float
    conn: int
    kind: str
    nbytes: int
    key: str = ''


class _Incomplete(Exception):
    pass


def parse_request(buf: bytes, at: int = 0) -> Tuple[str, str, int]:
    """(kind, first key, end offset) of the request at ``buf[at:]``; :class:`_Incomplete` when
    more bytes are needed, ``ValueError`` for an unknown type."""
    def take(n: int) -> bytes:
        nonlocal at
        if at + n > len(buf):
            raise _Incomplete
        out = buf[at:at + n]
        at += n
        return out

    def string() -> bytes:
        return take(struct.unpack('<Q', take(8))[0])

    kind_id = take(1)[0]
    if kind_id >= len(QUERIES):
        raise ValueError(f'unknown TCPStore query type {kind_id}')
    kind, args = QUERIES[kind_id]
    key = b''
    for a in args:
        if a == 'u':
            take(4)
        elif a == 'q':
            take(8)
        elif a in 'sb':
            value = string()
            key = key or (value if a == 's' else b'')
        elif a == 'n':
            for _ in range(struct.unpack('<Q', take(8))[0]):
                value = string()
                key = key or value
        elif a == 'p':
            for _ in range(struct.unpack('<Q', take(8))[0]):
                value = string()
                key = key or value
                string()
    return kind, key.decode(errors='replace'), at


class StoreProxy:
    """Forward ``host:port`` (the proxy's, :attr:`port`) to a store at ``host:upstream``, recording
    a :class:`Request` for each request a client sends and the bytes of each reply."""

    def __init__(self, upstream: int, host: str = '127.0.0.1') -> None:
        self.upstream, self.host = upstream, host
        self.requests: List[Request] = []
        self.replies: List[Tuple[float, int, int]] = []  # (time, conn, bytes)
        self.unparsed: Dict[int, str] = {}  # conn -> why its parsing stopped
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._conns = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name='store-proxy').start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.host, self.upstream))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                conn = self._conns
                self._conns += 1
            threading.Thread(target=self._requests, args=(client, upstream, conn),
                             daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client, conn),
                             daemon=True).start()

    def _requests(self, src: socket.socket, dst: socket.socket, conn: int) -> None:
        buf, parsing = b'', True
        while True:
            data = _recv(src)
            if not data:
                _shut(dst)
                return
            now = time.time()
            dst.sendall(data)
            if not parsing:
                with self._lock:
                    self.requests.append(Request(now, conn, 'unparsed', len(data)))
                continue
            buf += data
            at = 0
            while at < len(buf):
                try:
                    kind, key, end = parse_request(buf, at)
                except _Incomplete:
                    break
                except ValueError as e:
                    self.unparsed[conn] = str(e)
                    with self._lock:
                        self.requests.append(Request(now, conn, 'unparsed', len(buf) - at))
                    parsing, at = False, len(buf)
                    break
                with self._lock:
                    self.requests.append(Request(now, conn, kind, end - at, key))
                at = end
            buf = buf[at:]

    def _replies(self, src: socket.socket, dst: socket.socket, conn: int) -> None:
        while True:
            data = _recv(src)
            if not data:
                _shut(dst)
                return
            with self._lock:
                self.replies.append((time.time(), conn, len(data)))
            dst.sendall(data)

    def snapshot(self) -> Tuple[List[Request], List[Tuple[float, int, int]]]:
        with self._lock:
            return list(self.requests), list(self.replies)

    def connection_of(self, marker: str) -> Dict[str, int]:
        """``{suffix: conn}`` for each ``set`` whose key holds ``marker`` (what follows it): how a
        caller learns which connection is which rank's."""
        requests, _ = self.snapshot()
        return {r.key.split(marker, 1)[1]: r.conn for r in requests
                if r.kind == 'set' and marker in r.key}


def _recv(s: socket.socket) -> Optional[bytes]:
    try:
        return s.recv(1 << 16)
    except OSError:
        return None


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
