"""Load profiles of the bench: how a level's requests are sent. A profile is a subclass of `LoadProfile` here and
one entry in PROFILES; `bench.mode` names it, and the client, the reports and the config check go through it.

  concurrency  N requests in flight at all times (closed loop)
  poisson      requests arrive at `rate` per second with exponential gaps (open loop, seeded), optionally
               capped at `max_in_flight`
  burst        all requests of the level sent at once
A level's load is its number: the concurrency, the rate or the burst size (a sweep is several levels)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar

Send = Callable[[int, "asyncio.Semaphore | None", bool], Awaitable[None]]


class LoadProfile:
    name: ClassVar[str]
    level_name: ClassVar[str]  # column header of the level in reports

    def check(self, cfg) -> str | None:
        """A reason the config cannot run this profile (checked when the config loads), else None."""
        return None

    def default_level(self, cfg) -> float:
        """The level when no sweep is given."""
        raise NotImplementedError

    def requests(self, cfg, level: float) -> int:
        """Measured requests at this level."""
        return cfg.requests

    def max_in_flight(self, cfg, level: float) -> int:
        """Requests in flight at most (0: no bound); the client's connection pool is sized from it, so the pool
        never quietly queues an open-loop load."""
        return int(level)

    async def schedule(self, cfg, level: float, rng, deadline: float | None, send: Send, tasks: list) -> None:
        """Start the level's requests, appending their tasks to `tasks`; nothing new after `deadline`."""
        raise NotImplementedError


class Concurrency(LoadProfile):
    name, level_name = "concurrency", "concurrency"

    def default_level(self, cfg) -> float:
        return cfg.concurrency

    async def schedule(self, cfg, level, rng, deadline, send, tasks) -> None:
        sem = asyncio.Semaphore(int(level))

        async def slot(i):
            try:
                await send(i, None, True)
            finally:
                sem.release()

        for i in range(cfg.requests):
            await sem.acquire()  # closed loop: the next request leaves when one finishes
            if deadline and time.perf_counter() > deadline:
                sem.release()
                break
            tasks.append(asyncio.ensure_future(slot(i)))


class Poisson(LoadProfile):
    name, level_name = "poisson", "rate (req/s)"

    def check(self, cfg) -> str | None:
        return "mode poisson needs rate (requests/s) or sweep" if cfg.rate is None and not cfg.sweep else None

    def default_level(self, cfg) -> float:
        return cfg.rate

    def max_in_flight(self, cfg, level) -> int:
        return cfg.max_in_flight or 0

    async def schedule(self, cfg, level, rng, deadline, send, tasks) -> None:
        import numpy as np

        sem = asyncio.Semaphore(cfg.max_in_flight) if cfg.max_in_flight else None
        gaps = rng.exponential(1.0 / level, size=cfg.requests)
        start = time.perf_counter()
        for i, at in enumerate(np.cumsum(gaps) - gaps[0]):  # the first request leaves at once
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if deadline and time.perf_counter() > deadline:
                break
            tasks.append(asyncio.ensure_future(send(i, sem, True)))


class Burst(LoadProfile):
    name, level_name = "burst", "burst"

    def default_level(self, cfg) -> float:
        return cfg.requests

    def requests(self, cfg, level) -> int:
        return int(level)

    async def schedule(self, cfg, level, rng, deadline, send, tasks) -> None:
        tasks.extend(asyncio.ensure_future(send(i, None, True)) for i in range(int(level)))


PROFILES: dict[str, LoadProfile] = {p.name: p for p in (Concurrency(), Poisson(), Burst())}
