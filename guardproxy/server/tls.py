"""TLS towards clients and towards Postgres.

Client side: a server SSLContext from ``tls_cert_file`` / ``tls_key_file`` (reloaded
when the files change, so certificates rotate without a restart), optionally asking
for client certificates signed by ``tls_client_ca_file``. The channel-binding data
of SCRAM-SHA-256-PLUS (``tls-server-end-point``) is the hash of our certificate.

Upstream TLS is in guardproxy.pool.upstream_tls.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from guardproxy.protocol.errors import ConfigError


@dataclass
class ServerTLS:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None
    require: bool
    _context: ssl.SSLContext | None = None
    _stamp: tuple[float, float] = (0.0, 0.0)
    end_point: bytes = b""

    def context(self) -> ssl.SSLContext:
        """The current context; rebuilt when the certificate or key file changed on disk."""
        try:
            stamp = (self.cert_file.stat().st_mtime, self.key_file.stat().st_mtime)
        except OSError as exc:
            if self._context is not None:
                return self._context  # keep serving with what we have; the reload will say why
            raise ConfigError(f"TLS certificate or key unreadable: {exc}") from exc
        if self._context is None or stamp != self._stamp:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file)
                if self.client_ca_file is not None:
                    ctx.load_verify_locations(self.client_ca_file)
                    ctx.verify_mode = ssl.CERT_OPTIONAL
            except (OSError, ssl.SSLError) as exc:
                if self._context is not None:
                    return self._context
                raise ConfigError(
                    f"cannot load TLS certificate {self.cert_file} / key {self.key_file}: {exc}"
                ) from exc
            self._context, self._stamp = ctx, stamp
            self.end_point = certificate_end_point(self.cert_file.read_bytes())
        return self._context


def certificate_end_point(pem: bytes) -> bytes:
    """tls-server-end-point channel binding data (RFC 5929): hash of the DER certificate."""
    cert = x509.load_pem_x509_certificate(pem)
    algorithm = cert.signature_hash_algorithm
    name = algorithm.name if algorithm is not None else "sha256"
    if name in ("md5", "sha1"):
        name = "sha256"
    der = cert.public_bytes(encoding=Encoding.DER)
    return hashlib.new(name, der).digest()


def peer_common_name(ssl_object: ssl.SSLObject | None) -> str | None:
    """The CN of a verified client certificate, if the client presented one."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for attribute in rdn:
            if attribute[0] == "commonName":
                return str(attribute[1])
    return None
