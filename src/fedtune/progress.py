"""Progress bars (rich) for rounds, clients and steps, or nothing in quiet mode."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class Bars:
    """Named progress bars; every method is a no-op when ``quiet``."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._progress: Progress | None = None
        self._tasks: dict[str, int] = {}

    @contextmanager
    def live(self) -> Iterator["Bars"]:
        if self.quiet:
            yield self
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        with self._progress:
            yield self
        self._progress = None
        self._tasks.clear()

    def start(self, name: str, total: int, info: str = "") -> None:
        """(Re)start the bar called `name` at 0 of `total`."""
        if self._progress is None:
            return
        if name in self._tasks:
            self._progress.reset(self._tasks[name], total=total, info=info)
        else:
            self._tasks[name] = self._progress.add_task(name, total=total, info=info)

    def advance(self, name: str, info: str | None = None, by: int = 1) -> None:
        if self._progress is None or name not in self._tasks:
            return
        kw = {"info": info} if info is not None else {}
        self._progress.update(self._tasks[name], advance=by, **kw)

    def print(self, *args) -> None:
        if not self.quiet:
            (self._progress.console if self._progress else console).print(*args)
