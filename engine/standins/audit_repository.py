"""A syslog collector (the audit repository stand-in): RFC 6587 frames, TCP or TLS.

``SyslogReceiver("tcp")`` / ``SyslogReceiver("tls", tmp_path)`` listen on a
free 127.0.0.1 port; TLS uses a throw-away CA and server certificate made
with ``cryptography`` (``ca_file`` is what the client trusts). Every message
received is kept in ``messages`` (bytes); ``stop()`` closes the listener and
every connection, ``start()`` listens again on the same port.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from engine.audit.syslog import BOM, parse_frames


def make_ca_and_server_cert(folder: Path, *, client: bool = False) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost (and, with ``client``,
    a client certificate), as PEM files in ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def key_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("orthanc-ai test CA"))
          .issuer_name(name("orthanc-ai test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage, san: list) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    out = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert, key = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                     [x509.DNSName("localhost"),
                      x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    out["cert"].write_bytes(cert)
    out["key"].write_bytes(key)
    if client:
        cert, key = leaf("orthanc-ai test client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
        out["client_cert"], out["client_key"] = folder / "client.pem", folder / "client.key"
        out["client_cert"].write_bytes(cert)
        out["client_key"].write_bytes(key)
    return out


_HEADER = re.compile(rb"^<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*?\]) ?(.*)$", re.S)


@dataclass(frozen=True)
class Syslog:
    """One RFC 5424 message, split into its header fields."""

    pri: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    msg: bytes

    @property
    def facility(self) -> int:
        return self.pri // 8

    @property
    def severity(self) -> int:
        return self.pri % 8

    @property
    def xml(self) -> str:
        body = self.msg[len(BOM):] if self.msg.startswith(BOM) else self.msg
        return body.decode("utf-8")


def parse_syslog(message: bytes) -> Syslog:
    m = _HEADER.match(message)
    if m is None:
        raise ValueError(f"not an RFC 5424 message: {message[:80]!r}")
    pri, ts, host, app, pid, msgid, sd, msg = m.groups()
    return Syslog(int(pri), ts.decode(), host.decode(), app.decode(), pid.decode(),
                  msgid.decode(), sd.decode(), msg)


class SyslogReceiver:
    def __init__(self, transport: str = "tcp", folder: Path | None = None, *,
                 require_client_cert: bool = False) -> None:
        self.transport = transport
        self.port = 0
        self.messages: list[bytes] = []
        self.errors: list[str] = []
        self.connections = 0  # accepted so far
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.files: dict[str, Path] = {}
        self.context: ssl.SSLContext | None = None
        if transport == "tls":
            assert folder is not None, "TLS needs a folder for the certificates"
            self.files = make_ca_and_server_cert(folder, client=require_client_cert)
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.files["cert"], self.files["key"])
            if require_client_cert:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(self.files["ca"])
            self.context = ctx

    @property
    def ca_file(self) -> str:
        return str(self.files.get("ca", ""))

    def start(self) -> SyslogReceiver:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(16)
        sock.settimeout(0.2)
        self.port = sock.getsockname()[1]
        self._listener, self._stop = sock, threading.Event()
        self._thread = threading.Thread(target=self._accept, args=(sock, self._stop),
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection (clients see them closed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def __enter__(self) -> SyslogReceiver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, stop), daemon=True).start()

    def _serve(self, conn: socket.socket, stop: threading.Event) -> None:
        try:
            if self.context is not None:
                conn.settimeout(5)
                conn = self.context.wrap_socket(conn, server_side=True)
            conn.settimeout(0.2)
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(f"handshake: {exc}")
            conn.close()
            return
        with self._lock:
            self._conns.append(conn)
        buffer = b""
        while not stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                break
            if not data:
                break
            buffer += data
            try:
                frames, buffer = parse_frames(buffer)
            except ValueError as exc:
                self.errors.append(str(exc))
                break
            with self._lock:
                self.messages.extend(frames)
        try:
            conn.close()
        except OSError:
            pass

    # -- what arrived ------------------------------------------------------------

    def parsed(self) -> list[Syslog]:
        with self._lock:
            return [parse_syslog(m) for m in self.messages]

    def wait_for(self, predicate, timeout: float = 30.0) -> list[Syslog]:
        """Wait until ``predicate(parsed messages)`` holds; the messages."""
        deadline = time.time() + timeout
        while True:
            got = self.parsed()
            if predicate(got):
                return got
            if time.time() > deadline:
                raise TimeoutError(f"{len(got)} message(s) received; errors {self.errors}")
            time.sleep(0.1)
