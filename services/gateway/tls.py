"""TLS settings checks, shared by the gateway and the launcher (which runs them before any model loads)."""

from __future__ import annotations

import ssl


def tls_error(cert: str | None, key: str | None, client_ca: str | None) -> str | None:
    """TGIS's start-up error for half-given TLS settings, or None."""
    if bool(cert) != bool(key):
        return "tls: must provide both cert and key"
    if client_ca and not cert:
        return "tls: cannot provide client ca cert without keypair"
    return None


def tls_files_error(cert: str | None, key: str | None, client_ca: str | None) -> str | None:
    """Why the TLS files cannot serve (unreadable, not PEM, key not matching the certificate), or None."""
    error = tls_error(cert, key, client_ca)
    if error or not cert:
        return error
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        # OpenSSL's "[X509: KEY_VALUES_MISMATCH]" and the like, said plainly with the files involved.
        reason = "the key does not match the certificate" if "MISMATCH" in str(exc).upper() else str(exc)
        return f"tls: cannot use cert {cert} with key {key}: {reason}"
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            return f"tls: cannot read client ca cert {client_ca}: {exc}"
    return None
