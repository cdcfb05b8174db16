"""The engine thread (services/engine/async_engine.py) and the event loop that hands its outputs on."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import services.engine.async_engine as async_engine_module
from services.engine.async_engine import AsyncEngine
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sampling_params import SamplingParams


async def test_on_the_cpu_a_step_starts_once_the_last_steps_outputs_reached_their_reader(
        small_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no bound on the wait, every step begins after the reader took the tokens of all steps before it,
    however long the reader keeps the loop busy."""
    monkeypatch.setattr(async_engine_module, "OUTPUT_WAIT_S", 60.0)
    engine = LLMEngine(EngineConfig(model=str(small_model)))
    served = AsyncEngine(engine)
    assert served.wait_for_outputs
    read: list[int] = []  # the tokens the reader has taken
    read_at_step: list[int] = []  # how many it had taken as each step began
    step = engine.step

    def counted_step(*args: Any) -> Any:
        read_at_step.append(len(read))
        return step(*args)

    engine.step = counted_step  # type: ignore[method-assign]
    served.start()
    try:
        stream = served.open_stream("r1")
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        await served.call(lambda e: e.add_request("r1", list(range(10, 40)), params))
        async for batch in served.outputs("r1", stream):
            read.extend(t for out in batch for t in out.new_token_ids)
            time.sleep(0.02)  # the loop stays busy: without the wait the engine would run ahead of the reader
    finally:
        served.stop()
    assert len(read) == 12
    # The first step prefills (and makes the first token); each later one makes one token.
    assert read_at_step == list(range(len(read_at_step)))
