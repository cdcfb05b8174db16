"""Every environment variable pdserve reads, in one typed place (prefix PDSERVE_)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Env:
    home: Path  # PDSERVE_HOME: cache of generated models (default ~/.cache/pdserve)
    # PDSERVE_FAULT: test-only fault injection. "drop_kv": prefill workers send no KV, so hand-offs
    # time out on the decode side and the failure policy is exercised end to end.
    fault: str
    # PDSERVE_HOST: the default of `pdserve serve --host`; the Docker images set it to 0.0.0.0, so that a
    # container is reachable from outside.
    host: str
    # PDSERVE_API_KEYS: API keys, comma-separated, besides --api-key and --api-key-file (router/auth.py).
    api_keys: str
    # PDSERVE_KV_TOKEN: the cluster's KV token, unless TransferConfig.token_file (--kv-token-file) names a file
    # (transfer/handshake.py). Ray's workers inherit it from the raylet's environment.
    kv_token: str

    @classmethod
    def read(cls) -> Env:
        return cls(
            home=Path(os.environ.get("PDSERVE_HOME", Path.home() / ".cache" / "pdserve")),
            fault=os.environ.get("PDSERVE_FAULT", ""),
            host=os.environ.get("PDSERVE_HOST", "127.0.0.1"),
            api_keys=os.environ.get("PDSERVE_API_KEYS", ""),
            kv_token=os.environ.get("PDSERVE_KV_TOKEN", ""),
        )


ENV = Env.read()
