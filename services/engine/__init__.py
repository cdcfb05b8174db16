"""The model-execution engine. `from services.engine import LLM, SamplingParams` is the offline API.

LLM is loaded lazily so that the pure-Python parts (scheduler, block manager) import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from services.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from services.engine.llm import LLM

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from services.engine.llm import LLM

        return LLM
    raise AttributeError(name)
