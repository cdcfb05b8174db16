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

    @classmethod
    def read(cls) -> Env:
        return cls(
            home=Path(os.environ.get("PDSERVE_HOME", Path.home() / ".cache" / "pdserve")),
            fault=os.environ.get("PDSERVE_FAULT", ""),
        )


ENV = Env.read()
