"""Progress while a run works: on a terminal, a live rich display with one row per target
(spinner, its latest stage, elapsed time); elsewhere (CI logs, pipes) one plain line per event.
rich honours NO_COLOR. The run calls it with ``"target: what it does"`` messages."""
from __future__ import annotations

import sys
import threading
from typing import Any


_RUN_ROWS = ("run", "reference")


class Display:
    def __init__(self, live: bool):
        from rich.console import Console

        self._console = Console(stderr=True, highlight=False,
                                width=None if sys.stderr.isatty() else 120)
        self._lock = threading.Lock()  # targets report from their own threads
        self._progress: Any = None
        self._rows: dict[str, Any] = {}
        if live:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[who]}"),
                                      TextColumn("{task.description}"), TimeElapsedColumn(),
                                      console=self._console, transient=True)
            self._progress.start()

    def __call__(self, message: str) -> None:
        with self._lock:
            if self._progress is None:
                self._console.print(f"[dim]· {message}[/]")
                return
            who, sep, what = message.partition(": ")
            who, what = (who, what) if sep and " " not in who else ("run", message)
            if who not in self._rows:
                self._rows[who] = self._progress.add_task(what, who=who, total=None)
            self._progress.update(self._rows[who], description=what)
            if who not in _RUN_ROWS:  # the targets are under way: the run's own rows are done
                for row in _RUN_ROWS:
                    if row in self._rows:
                        self._progress.update(self._rows[row], visible=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> Display:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
