"""A lap clock for the report's stage timings."""
from __future__ import annotations

import time


class Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> float:
        """Record the seconds since the previous lap (or start) under ``name``; return them."""
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 3)
        self._t = now
        return self.laps[name]
