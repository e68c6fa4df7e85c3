"""Mutual TLS for the mesh hop: SSL contexts built from files, and TlsStream over a non-blocking SSLSocket."""

from __future__ import annotations

import errno
import socket
import ssl

import trio

from mesh import spiffe
from mesh.stream import YIELD_EVERY

# TLS 1.2 suites: forward secrecy and authenticated encryption only (TLS 1.3's suites all are).
_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# ALPN on the mesh hop (docs/wire.md): an inbound accepts h2 and http/1.1 (preferring h2); an outbound offers h2
# for requests that may share a multiplexed connection, and http/1.1 alone for upgrades and opaque TCP.
ALPN_H2 = ["h2", "http/1.1"]
ALPN_HTTP1 = ["http/1.1"]
_RECEIVE_SIZE = 65536


def server_context(cert_file: str, key_file: str, bundle_file: str) -> ssl.SSLContext:
    """The inbound side's context: our certificate, and a client certificate required and verified against the bundle.

    Contexts are immutable once built: certificate rotation builds a new one, which new connections use while
    established connections keep theirs."""
    return _context(True, cert_file, key_file, bundle_file)


def client_context(cert_file: str, key_file: str, bundle_file: str, *, http2: bool = True) -> ssl.SSLContext:
    """The outbound side's context: our certificate, and the peer's chain verified against the bundle; ALPN offers
    h2 and http/1.1 (or http/1.1 alone, `http2=False`).

    The host name is not checked: the peer's identity is its SPIFFE ID (URI SAN), which the caller compares with
    the expected one after the handshake (TlsStream.peer_identity)."""
    return _context(False, cert_file, key_file, bundle_file, ALPN_H2 if http2 else ALPN_HTTP1)


def _context(
    server_side: bool, cert_file: str, key_file: str, bundle_file: str, alpn: list[str] = ALPN_H2
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_CIPHERS)
    # OP_IGNORE_UNEXPECTED_EOF: a peer's half-close (see TlsStream.send_eof) arrives as a TCP FIN without a
    # close_notify; without the flag OpenSSL 3 fails the connection and we could not send our remaining bytes.
    # Truncation is still detected where it matters, by the message framing above TLS (as with any HTTP/1.1 hop).
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_IGNORE_UNEXPECTED_EOF
    # No session resumption: every connection presents a certificate and has it verified against the current
    # bundle (a resumed session brings back the peer certificate of an earlier handshake). OP_NO_TICKET: no TLS
    # 1.2 tickets issued, nor asked for; num_tickets = 0: no TLS 1.3 tickets. The stdlib offers no way to turn
    # off the server's session-ID cache, so a TLS 1.2 client can still resume by session ID (while the session's
    # first connection is open, or after it ended with a close_notify): TlsStream refuses every handshake that
    # reports a reused session.
    ctx.options |= ssl.OP_NO_TICKET
    if server_side:
        ctx.num_tickets = 0
    else:
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(cert_file, key_file)
    ctx.load_verify_locations(cafile=bundle_file)
    ctx.set_alpn_protocols(alpn)
    return ctx


class TlsHandshakeError(trio.BrokenResourceError):
    """The TLS handshake failed or was refused; `reason` says why in plain words (e.g. "peer sent no certificate").

    `refusal` names the kind (as metrics.TLS_REFUSAL_REASONS does): "handshake_failed" (OpenSSL failed it: chain,
    protocol, cipher, ...) or "session_reused" (the peer resumed a session instead of presenting its certificate)."""

    def __init__(self, reason: str, refusal: str = "handshake_failed") -> None:
        super().__init__(reason)
        self.reason = reason
        self.refusal = refusal


class TlsStream(trio.abc.HalfCloseableStream):
    """A half-closeable TLS stream that drives a non-blocking `ssl.SSLSocket` it owns.

    trio.SSLStream runs OpenSSL over memory BIOs: every record costs several Python calls and a separate socket
    call, and every call yields to the scheduler. Here OpenSSL reads and writes the socket itself; a call waits
    (trio.lowlevel.wait_readable/wait_writable) only when OpenSSL says it would block, and a call that did not
    wait yields every `YIELD_EVERY` times, as FastStream does, so no connection can hold the event loop.
    Only one task may send and one may receive at a time. A send_all that is cancelled after OpenSSL started
    writing leaves a partly written record, so the stream is broken for sending afterwards.

    Half-close (send_eof) is a TCP FIN without a TLS close_notify unless the peer has already finished sending:
    Python's SSLSocket.unwrap() sends close_notify and then, in the same call, reads for the peer's; application
    bytes still arriving make it fail, and they are lost. The peer's close_notify or FIN reads as b"".
    """

    __slots__ = (
        "_alpn",
        "_closed",
        "_eof_received",
        "_eof_sent",
        "_lots",
        "_send_broken",
        "_streak",
        "_waiting",
        "peer_identity",
        "socket",
    )

    def __init__(
        self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        """Take ownership of a connected socket (it is detached into `self.socket`); no handshake yet."""
        sock.setblocking(False)
        self.socket: ssl.SSLSocket = ctx.wrap_socket(
            sock, server_side=server_side, server_hostname=server_hostname, do_handshake_on_connect=False
        )
        self.peer_identity: str | None = None
        self._alpn: str | None = None
        self._closed = False
        self._eof_received = False
        self._eof_sent = False
        self._send_broken = False
        self._streak = 0
        # trio allows one waiter per socket and direction; a receive may need writability (and a send readability)
        # while the other side's task waits for it, so the second waiter parks until the first one's wait ends.
        self._waiting = [False, False]  # [readable, writable]
        self._lots = (trio.lowlevel.ParkingLot(), trio.lowlevel.ParkingLot())

    def __repr__(self) -> str:
        return f"<TlsStream fd={self.socket.fileno()} peer={self.peer_identity}>"

    async def do_handshake(self) -> None:
        """Run the handshake; TlsHandshakeError says why it failed. Records the peer's SPIFFE ID and the ALPN choice.

        A handshake that resumed a session is refused (TlsHandshakeError) once OpenSSL has completed it: the peer
        sees the connection closed. Whether the peer's certificate is an X.509-SVID is the caller's to check
        (mesh.transport does, on the mesh hop); peer_identity is read from its URI SAN alone.

        With TLS 1.3 the client's handshake ends before the server has checked the client's certificate: a server
        that refuses it is seen by the client on its first receive (BrokenResourceError with the reason)."""
        sock = self.socket
        while True:
            try:
                sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._wait(0)
            except ssl.SSLWantWriteError:
                await self._wait(1)
            except OSError as exc:
                raise TlsHandshakeError(describe(exc)) from exc
        if sock.session_reused:
            raise TlsHandshakeError(
                "the peer resumed a TLS session instead of presenting its certificate", "session_reused"
            )
        self.peer_identity = spiffe.peer_identity(sock.getpeercert())
        self._alpn = sock.selected_alpn_protocol()

    def selected_alpn_protocol(self) -> str | None:
        """The protocol both sides agreed on with ALPN (after the handshake), or None."""
        return self._alpn

    async def _wait(self, direction: int) -> None:
        """Wait until the socket is readable (0) or writable (1), or until another task's wait for it ends."""
        if self._waiting[direction]:
            await self._lots[direction].park()
            return
        self._waiting[direction] = True
        try:
            if direction:
                await trio.lowlevel.wait_writable(self.socket)
            else:
                await trio.lowlevel.wait_readable(self.socket)
        finally:
            self._waiting[direction] = False
            self._lots[direction].unpark_all()

    async def _maybe_yield(self) -> None:
        # As FastStream: a yield after a call that completed never raises Cancelled (bytes received are returned).
        self._streak += 1
        if self._streak >= YIELD_EVERY:
            self._streak = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._eof_received:
            # also after send_eof's close_notify, which detaches OpenSSL from the socket
            await trio.lowlevel.checkpoint()
            return b""
        sock = self.socket
        size = max_bytes or _RECEIVE_SIZE
        # The call comes first: bytes OpenSSL already decrypted (sock.pending()) do not make the socket readable.
        try:
            data = sock.recv(size)
        except ssl.SSLWantReadError:
            direction = 0
        except ssl.SSLWantWriteError:
            direction = 1
        except OSError as exc:
            raise _broken(exc) from exc
        else:
            if not data:
                self._eof_received = True
            await self._maybe_yield()
            return data
        self._streak = 0
        while True:
            await self._wait(direction)
            try:
                data = sock.recv(size)
            except ssl.SSLWantReadError:
                # readable, but only part of a record has arrived
                direction = 0
                continue
            except ssl.SSLWantWriteError:
                direction = 1
                continue
            except OSError as exc:
                raise _broken(exc) from exc
            if not data:
                self._eof_received = True
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof was called: this stream can no longer send")
        if self._send_broken:
            raise trio.BrokenResourceError("an earlier send_all was interrupted in the middle of a TLS record")
        if not data:
            await self._maybe_yield()
            return
        sock = self.socket
        # OpenSSL either takes all of `data` or says it would block; in the latter case it may have written part of
        # it already and must be called again with the same buffer, until it has taken all of it.
        try:
            sock.send(data)
        except ssl.SSLWantWriteError:
            direction = 1
        except ssl.SSLWantReadError:
            direction = 0
        except OSError as exc:
            raise _broken(exc) from exc
        else:
            await self._maybe_yield()
            return
        self._streak = 0
        try:
            while True:
                await self._wait(direction)
                try:
                    sock.send(data)
                    return
                except ssl.SSLWantWriteError:
                    direction = 1
                except ssl.SSLWantReadError:
                    direction = 0
                except OSError as exc:
                    raise _broken(exc) from exc
        except BaseException:
            self._send_broken = True
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._wait(1)

    async def send_eof(self) -> None:
        """Half-close: the peer reads b"" after everything sent before; we can still receive.

        If the peer has already finished sending, a TLS close_notify goes before the FIN. Otherwise only the FIN
        is sent (see the class docstring); our own contexts read a FIN as the end of the stream."""
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        await trio.lowlevel.checkpoint()
        if self._eof_sent:
            return
        if self._send_broken:
            raise trio.BrokenResourceError("an earlier send_all was interrupted in the middle of a TLS record")
        self._eof_sent = True
        sock = self.socket
        try:
            if self._eof_received:
                while True:
                    try:
                        sock.unwrap()  # sends close_notify; nothing is in flight from the peer any more
                        break
                    except ssl.SSLWantWriteError:
                        await self._wait(1)
                    except ssl.SSLWantReadError:
                        break  # only raised once our close_notify is out (unwrap then looks for the peer's)
            # socket.socket's own shutdown: SSLSocket.shutdown() would also drop OpenSSL's state, and what we
            # receive afterwards would be returned as raw ciphertext.
            socket.socket.shutdown(sock, socket.SHUT_WR)
        except OSError as exc:
            raise _broken(exc) from exc

    def close(self) -> None:
        """Close at once (no close_notify); wakes any task waiting on the socket with ClosedResourceError."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()

    async def aclose(self) -> None:
        """Send a close_notify if the socket takes it at once (never waits for it), then close."""
        if not (self._closed or self._eof_sent or self._send_broken):
            try:
                self.socket.unwrap()
            except OSError:
                # No handshake yet, or the close_notify could not be written, or it was and the peer's did not
                # follow at once: either way we are done. (unwrap reads for the peer's close_notify, and may
                # discard unread bytes: we are closing.)
                pass
        self.close()
        await trio.lowlevel.checkpoint()


def _broken(exc: OSError) -> trio.BrokenResourceError:
    return trio.BrokenResourceError(describe(exc))


async def tls_connect(sock: socket.socket, ctx: ssl.SSLContext, *, server_hostname: str) -> TlsStream:
    """Run the client side of the handshake on a connected socket (SNI = server_hostname) and return the stream.

    On failure the socket is closed and TlsHandshakeError says why; on cancellation it is closed too."""
    return await _handshake(sock, ctx, server_side=False, server_hostname=server_hostname)


async def tls_accept(sock: socket.socket, ctx: ssl.SSLContext) -> TlsStream:
    """Run the server side of the handshake on an accepted socket and return the stream.

    On failure the socket is closed and TlsHandshakeError says why; on cancellation it is closed too."""
    return await _handshake(sock, ctx, server_side=True, server_hostname=None)


async def _handshake(
    sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool, server_hostname: str | None
) -> TlsStream:
    try:
        stream = TlsStream(sock, ctx, server_side=server_side, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise
    try:
        await stream.do_handshake()
    except BaseException:
        stream.close()
        raise
    return stream


# OpenSSL's reason codes (ssl.SSLError.reason) in words an operator can act on. Alerts are what the peer told us.
_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "peer sent no certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "peer requires a client certificate and we sent none",
    "UNSUPPORTED_PROTOCOL": "unsupported protocol: the peer offered no TLS version >= 1.2",
    "TLSV1_ALERT_PROTOCOL_VERSION": "unsupported protocol: the peer refused our TLS version",
    "NO_PROTOCOLS_AVAILABLE": "unsupported protocol: no TLS version enabled on both sides",
    "WRONG_SSL_VERSION": "unsupported protocol",
    "NO_SHARED_CIPHER": "no shared cipher: the peer offered no ECDHE+AEAD cipher suite",
    "NO_CIPHERS_AVAILABLE": "no shared cipher",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the peer refused the handshake (no shared cipher or protocol?)",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our certificate (issued by a CA not in its bundle)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer says our certificate has expired or is not yet valid",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected our certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the peer rejected our certificate (wrong key usage?)",
    "TLSV1_ALERT_DECRYPT_ERROR": "the peer could not verify our handshake signature",
    "HTTP_REQUEST": "the peer is not speaking TLS (it sent a plaintext HTTP request)",
    "WRONG_VERSION_NUMBER": "the peer is not speaking TLS (plaintext?)",
    "PACKET_LENGTH_TOO_LONG": "the peer is not speaking TLS (plaintext?)",
    "RECORD_LAYER_FAILURE": "the peer is not speaking TLS (plaintext?)",
    "UNEXPECTED_EOF_WHILE_READING": "the peer closed the connection",
}


# X509_V_ERR_* codes whose OpenSSL message does not say what to do.
_VERIFY_HINTS = {
    20: " (not issued by a CA in our trust bundle)",  # unable to get local issuer certificate
    26: " (the certificate lacks the clientAuth or serverAuth extended key usage)",  # unsuitable purpose
}


def describe(exc: OSError) -> str:
    """A TLS or socket error in plain words, e.g. "certificate verify failed: certificate has expired"."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}{_VERIFY_HINTS.get(exc.verify_code, '')}"
    if isinstance(exc, ssl.SSLZeroReturnError | ssl.SSLEOFError):
        return "the peer closed the connection"
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)
        if reason in _REASONS:
            return _REASONS[reason]
        if reason:
            return reason.lower().replace("_", " ")
        return str(exc)
    if exc.errno == errno.EPIPE:
        return "the peer closed the connection"
    if exc.errno == errno.ECONNRESET:
        return "the peer reset the connection"
    return exc.strerror or str(exc)
