"""The engines a run can use, by the name `--engine` takes: the one place an engine is chosen."""

from __future__ import annotations

from indexer.config import IndexConfig
from indexer.engine import Engine
from indexer.local_engine import LocalEngine
from indexer.ray_engine import RayEngine
from store.errors import InputError

ENGINES: dict[str, Engine] = {engine.name: engine for engine in (LocalEngine(), RayEngine())}


def engine_for(config: IndexConfig) -> Engine:
    """The engine *config* names, checked against the options it cannot honour."""
    engine = ENGINES.get(config.engine)
    if engine is None:
        raise InputError(f"unknown engine '{config.engine}' (one of {', '.join(ENGINES)})")
    engine.check(config)
    return engine
