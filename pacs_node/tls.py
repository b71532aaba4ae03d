"""SSL contexts for DICOM TLS (listener and exports) and HTTPS exports; TLS 1.2 minimum."""

from __future__ import annotations

import ssl
from pathlib import Path

from pacs_node.config import ConfigError, TlsConfig


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """Context for the listener: our certificate and key; client certificates checked against ``ca``.

    With ``require_client_cert`` a client without a certificate signed by ``ca`` is refused.
    """
    if not (tls.cert and tls.key):
        raise ConfigError("TLS listener needs a certificate and a key (listener.tls.cert, listener.tls.key)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, tls.cert, tls.key)
    if tls.ca:
        ctx.load_verify_locations(cafile=str(tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    elif tls.require_client_cert:
        raise ConfigError("listener.tls.require_client_cert needs listener.tls.ca to check client certificates")
    return ctx


def client_context(tls: TlsConfig | None) -> ssl.SSLContext:
    """Context for outgoing connections: verify the peer against ``ca`` (or the system store).

    Sends our certificate when ``cert`` and ``key`` are set (for peers that require client certificates).
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls and tls.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls and tls.cert and tls.key:
        _load_chain(ctx, tls.cert, tls.key)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from None
