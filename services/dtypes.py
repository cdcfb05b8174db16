"""The dtypes the engine runs in, by the name a config gives: a leaf both the engine and transfer import."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
