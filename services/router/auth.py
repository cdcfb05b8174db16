"""API keys and TLS for the router's gRPC and HTTP servers: what the start-up flags configure, and who may call what.

Keys come from `--api-key KEY` (repeatable), `--api-key-file FILE` (one a line; blank lines and `#` comments
skipped) and PDSERVE_API_KEYS (comma-separated); any one of them turns authentication on. A client sends
`Authorization: Bearer KEY`, as an HTTP header or as gRPC metadata. Health checks (HTTP /health, /version,
grpc.health.v1), /metrics and gRPC reflection stay open unless `--auth-all-endpoints` closes them too;
everything else needs a key. The servers enforce this (http_server's middleware, grpc_server's interceptor);
this module decides.

`--tls-cert` and `--tls-key` put both servers on TLS; `--tls-client-ca` also makes them require a client
certificate signed by that CA (mutual TLS). Every file is read and checked at start-up, so a missing key or a
certificate that does not load fails before any worker starts.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.env import ENV

API_KEYS_ENV = "PDSERVE_API_KEYS"
# The paths and gRPC services that `--auth-all-endpoints` closes and that are otherwise open.
OPEN_HTTP_PATHS = frozenset({"/health", "/metrics", "/version"})
OPEN_GRPC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                      "/grpc.reflection.v1.ServerReflection/")
MISSING_KEY = "no API key: send it as the header 'Authorization: Bearer <key>'"
WRONG_KEY = "invalid API key"


class SecurityConfigError(ValueError):
    """A start-up flag of the security group is wrong (a lone --tls-cert, an unreadable file, ...)."""


def _digest(key: str) -> bytes:
    # Keys are compared as SHA-256 digests: equal lengths, so compare_digest leaks not even a key's length.
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class ApiKeys:
    """The accepted keys (as digests) and which endpoints need one. No keys: everything is open."""

    digests: tuple[bytes, ...] = ()
    all_endpoints: bool = False  # health checks, /metrics and reflection need a key too

    def __post_init__(self) -> None:
        if self.all_endpoints and not self.digests:
            raise SecurityConfigError("--auth-all-endpoints needs an API key (--api-key, --api-key-file or "
                                      f"{API_KEYS_ENV})")

    @classmethod
    def of(cls, keys: Iterable[str], all_endpoints: bool = False) -> ApiKeys:
        unique: dict[bytes, None] = {}
        for key in keys:
            if not key or any(c.isspace() for c in key):
                raise SecurityConfigError("an API key must be non-empty and contain no whitespace")
            unique[_digest(key)] = None
        return cls(tuple(unique), all_endpoints)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def refusal(self, authorization: str | None) -> str | None:
        """None when `authorization` (the header or metadata value) carries a valid key; else why not."""
        if not self.digests:
            return None
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return MISSING_KEY
        given = _digest(token.strip())
        valid = False
        for digest in self.digests:  # no early exit: the time does not say which key matched
            valid |= hmac.compare_digest(given, digest)
        return None if valid else WRONG_KEY

    def http_path_open(self, path: str) -> bool:
        return not self.digests or (not self.all_endpoints and path in OPEN_HTTP_PATHS)

    def grpc_method_open(self, method: str) -> bool:
        """`method`: the full name, "/package.Service/Method"."""
        return not self.digests or (not self.all_endpoints and method.startswith(OPEN_GRPC_SERVICES))


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the server's certificate chain and key, and optionally the CA that signs client certificates."""

    cert: str
    key: str
    client_ca: str | None = None

    def __post_init__(self) -> None:
        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-client-ca", self.client_ca)):
            if path is not None:
                _check_readable(flag, path)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as e:
            raise SecurityConfigError(f"--tls-cert {self.cert} and --tls-key {self.key} do not load as a PEM "
                                      f"certificate chain and its private key: {e}") from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(self.client_ca)
            except ssl.SSLError as e:
                raise SecurityConfigError(f"--tls-client-ca {self.client_ca} is not a PEM certificate: {e}") from None

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """(certificate chain, private key, client CA or None) as bytes, as grpc's credentials take them."""
        with open(self.cert, "rb") as c, open(self.key, "rb") as k:
            cert, key = c.read(), k.read()
        if self.client_ca is None:
            return cert, key, None
        with open(self.client_ca, "rb") as ca:
            return cert, key, ca.read()

    def uvicorn_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"ssl_certfile": self.cert, "ssl_keyfile": self.key}
        if self.client_ca is not None:
            options |= {"ssl_ca_certs": self.client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return options


@dataclass(frozen=True)
class Security:
    """What the gRPC and HTTP servers enforce. The default is what a server without these flags does: nothing."""

    api_keys: ApiKeys = field(default_factory=ApiKeys)
    tls: TlsFiles | None = None

    @classmethod
    def from_flags(cls, api_key: Sequence[str] | None = None, api_key_file: str | None = None,
                   auth_all_endpoints: bool = False, tls_cert: str | None = None, tls_key: str | None = None,
                   tls_client_ca: str | None = None, env: dict[str, str] | None = None) -> Security:
        """From `pdserve serve`'s flags; `env` (default: the process's) supplies PDSERVE_API_KEYS."""
        keys = list(api_key or [])
        if api_key_file is not None:
            keys += read_key_file(api_key_file)
        from_env = ENV.api_keys if env is None else env.get(API_KEYS_ENV, "")
        keys += [k.strip() for k in from_env.split(",") if k.strip()]
        if (tls_cert is None) != (tls_key is None):
            raise SecurityConfigError("TLS needs both --tls-cert and --tls-key")
        if tls_client_ca is not None and tls_cert is None:
            raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key: client certificates are "
                                      "checked only over TLS")
        tls = TlsFiles(tls_cert, tls_key, tls_client_ca) if tls_cert is not None and tls_key is not None else None
        return cls(ApiKeys.of(keys, auth_all_endpoints), tls)

    def describe(self) -> str:
        """A line for the start-up log: what is on, never a key."""
        count = len(self.api_keys.digests)
        if not count:
            auth = "API key authentication is off"
        else:
            scope = "all endpoints" if self.api_keys.all_endpoints else "health, /metrics and reflection stay open"
            auth = f"API key authentication is on ({count} key{'s' if count > 1 else ''}; {scope})"
        if self.tls is None:
            return f"{auth}; TLS is off"
        return f"{auth}; TLS is on{' with client certificates (mTLS)' if self.tls.client_ca else ''}"


def read_key_file(path: str) -> list[str]:
    """One key a line; blank lines and lines starting with # are skipped. A file with no key is an error."""
    _check_readable("--api-key-file", path)
    with open(path, encoding="utf-8") as f:
        keys = [line.strip() for line in f if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise SecurityConfigError(f"--api-key-file {path} holds no key")
    return keys


def _check_readable(flag: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise SecurityConfigError(f"{flag} {path}: cannot read it ({e.strerror})") from None
