"""Run a test's coroutine against a started Engine on a fresh event loop, stopping the engine after."""

import asyncio
from typing import Awaitable, Callable, Optional, TypeVar

from kakeya_mlx.engine import Engine, EngineConfig
from kakeya_mlx.loader import LoadedModel

T = TypeVar("T")


def run_engine(
    loaded: LoadedModel, fn: Callable[[Engine], Awaitable[T]], draft: Optional[LoadedModel] = None, **config
) -> T:
    """`fn(engine)` on an Engine over `loaded` with EngineConfig(**config) (and `draft`); its result."""

    async def main() -> T:
        engine = Engine(loaded, EngineConfig(**config), draft=draft)
        await engine.start()
        try:
            return await fn(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())
