"""Generated protobuf and gRPC modules (built by `make proto` from proto/; never edited).

protoc writes imports of the form `from pdserve.v1 import ...`, so this folder is put
on sys.path before the generated modules are imported.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from pdserve.v1 import generation_pb2, generation_pb2_grpc, kv_pb2  # noqa: E402

__all__ = ["generation_pb2", "generation_pb2_grpc", "kv_pb2"]
