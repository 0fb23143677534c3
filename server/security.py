"""Transport security and bearer-token authentication for the gRPC server.

TLS: `server_credentials()` turns --tls-cert/--tls-key (and --tls-client-ca for mutual TLS) into
grpc.ServerCredentials, after checking at start that the files are readable PEM, that the key
belongs to the certificate and that the client CA parses -- gRPC itself would only find out at
the first handshake, and every handshake would then fail without a word in the server log.
`tls_material()` does the checks and returns the PEM bytes: the native front end serves TLS
from them (server/native_frontend.py).

Tokens: `read_token_file()` reads the shared secret once at start; `BearerTokenInterceptor`
answers UNAUTHENTICATED to every call whose metadata lacks `authorization: Bearer <token>`,
before the request is read or decoded. grpc.health.v1.Health is let through only when asked
(`exempt_health`, for Kubernetes' native gRPC probes, which cannot send metadata). Reflection is
never exempt: grpcurl and friends can send the header.

This module needs only grpc and the standard library (the serving install has no cryptography).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc

log = logging.getLogger("bnserve.server")

UNAUTHENTICATED_DETAIL = "missing or invalid bearer token"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
MIN_TOKEN_CHARS = 16  # shorter tokens are accepted, with a warning


class SecurityConfigError(ValueError):
    """A TLS or token setting cannot be used; the message says which file and why."""


# --------------------------------------------------------------------------------------------
# Files


def _read(path: Path, what: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SecurityConfigError(f"{flag} {path}: {what} file not found") from None
    except IsADirectoryError:
        raise SecurityConfigError(f"{flag} {path}: is a directory, not a {what} file") from None
    except OSError as exc:
        raise SecurityConfigError(f"{flag} {path}: cannot read the {what}: {exc}") from None
    if not data.strip():
        raise SecurityConfigError(f"{flag} {path}: the {what} file is empty")
    return data


def read_token_file(path: Path, flag: str = "--auth-token-file") -> str:
    """The token in `path`, read once and stripped of surrounding whitespace. Refused: an empty
    file, and a token that cannot travel in a gRPC metadata value as `Bearer <token>` (only
    visible ASCII, no inner whitespace: a second line in the file is a mistake, not a token)."""
    raw = _read(path, "token", flag)
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise SecurityConfigError(
            f"{flag} {path}: the token must be ASCII (visible characters, no spaces)"
        ) from None
    bad = sorted({c for c in token if not 0x21 <= ord(c) <= 0x7E})
    if bad:
        shown = ", ".join(repr(c) for c in bad[:5])
        raise SecurityConfigError(
            f"{flag} {path}: the token contains whitespace or control characters ({shown}); "
            "put exactly one token on one line"
        )
    if len(token) < MIN_TOKEN_CHARS:
        log.warning(
            "%s: the token has only %d characters; use at least 32 random ones "
            "(e.g. `openssl rand -hex 32`)",
            flag,
            len(token),
        )
    return token


def _no_password() -> NoReturn:
    raise SecurityConfigError("encrypted private key")


@dataclass(frozen=True)
class TlsMaterial:
    """What serving TLS takes, read and checked (PEM): both front ends build on it."""

    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None  # set: mutual TLS (a client certificate from this CA is required)


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None = None
) -> grpc.ServerCredentials | None:
    """Server TLS credentials, or None for plaintext (no cert and no key). With `client_ca`,
    mutual TLS: a client must present a certificate signed by that CA or the handshake fails."""
    material = tls_material(cert, key, client_ca)
    if material is None:
        return None
    return grpc.ssl_server_credentials(
        [(material.key_pem, material.cert_pem)],
        root_certificates=material.client_ca_pem,
        require_client_auth=material.client_ca_pem is not None,
    )


def tls_material(
    cert: Path | None, key: Path | None, client_ca: Path | None = None
) -> TlsMaterial | None:
    """The PEM files behind --tls-cert, --tls-key and --tls-client-ca, checked as far as OpenSSL
    can before a handshake (SecurityConfigError says which file and why); None for plaintext."""
    if cert is None and key is None:
        if client_ca is not None:
            raise SecurityConfigError(
                "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key as well"
            )
        return None
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        raise SecurityConfigError(f"{given} needs {missing}: give the certificate and key together")
    cert_pem = _read(cert, "certificate", "--tls-cert")
    key_pem = _read(key, "private key", "--tls-key")
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise SecurityConfigError(f"--tls-cert {cert}: not a PEM certificate")
    if b"PRIVATE KEY-----" not in key_pem:
        raise SecurityConfigError(f"--tls-key {key}: not a PEM private key")
    # The standard library's OpenSSL checks what gRPC would only check at the first handshake.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key), password=_no_password)
    except SecurityConfigError:
        raise SecurityConfigError(
            f"--tls-key {key}: the key is encrypted; gRPC needs an unencrypted PEM key "
            "(protect it with file permissions or a secret store)"
        ) from None
    except ssl.SSLError as exc:
        hint = (
            "the key does not belong to the certificate"
            if "KEY_VALUES_MISMATCH" in str(exc)
            else "unusable certificate or key"
        )
        raise SecurityConfigError(f"--tls-cert {cert} / --tls-key {key}: {hint} ({exc})") from None
    root: bytes | None = None
    if client_ca is not None:
        root = _read(client_ca, "client CA", "--tls-client-ca")
        try:
            context.load_verify_locations(cadata=root.decode("ascii", errors="replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise SecurityConfigError(
                f"--tls-client-ca {client_ca}: not PEM CA certificates ({exc})"
            ) from None
    return TlsMaterial(cert_pem=cert_pem, key_pem=key_pem, client_ca_pem=root)


# --------------------------------------------------------------------------------------------
# Bearer tokens


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


async def _deny(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAIL)


# A stream-stream handler answers any kind of call (unary or streaming) without reading a single
# request message: an unauthenticated client's payload is never deserialized.
_DENY_HANDLER = grpc.stream_stream_rpc_method_handler(_deny)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless the call carries `authorization: Bearer <token>`.

    The scheme is case-insensitive (RFC 7235), the token is compared in constant time (as
    SHA-256 digests with hmac.compare_digest, so not even its length leaks). Unknown methods
    get UNAUTHENTICATED as well: an anonymous caller learns nothing about the API.
    """

    def __init__(self, token: str, *, exempt_health: bool = False) -> None:
        if not token:
            raise SecurityConfigError("the bearer token is empty")
        self._expected = _digest(token.encode("ascii"))
        self._exempt_health = exempt_health
        self.rejected = 0  # calls answered UNAUTHENTICATED (tests, debugging)

    def exempt(self, method: str) -> bool:
        return self._exempt_health and method.startswith(HEALTH_PREFIX)

    def authorized(self, metadata: Any) -> bool:
        ok = False
        for key, value in metadata or ():
            if key != "authorization" or not isinstance(value, str):
                continue
            scheme, _, presented = value.partition(" ")
            if scheme.lower() != "bearer":
                continue
            # Compare every candidate: the time taken does not depend on which one matched.
            ok |= hmac.compare_digest(_digest(presented.strip().encode()), self._expected)
        return ok

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        if self.exempt(method) or self.authorized(metadata):
            return await continuation(handler_call_details)
        self.rejected += 1
        log.debug("refused %s: %s", method, UNAUTHENTICATED_DETAIL)
        return _DENY_HANDLER
