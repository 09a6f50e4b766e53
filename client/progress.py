"""Progress of blob transfers: what the transfer code reports to, and a rich display on stderr.

The transfer code calls ``start`` once per file, ``advance`` from any thread as bytes move, and
``finish`` when the file is done (or failed). ``Registry(progress=...)`` picks the reporter with
``resolve_progress``: by default a display only when stderr is a terminal, so scripts, pipes and
``--json`` output stay clean.
"""

from __future__ import annotations

import sys
import threading
from typing import Protocol, runtime_checkable

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

# Files smaller than this move too fast for a bar to help; they are not shown.
LARGE_FILE_BYTES = 8 << 20
IGNORED = -1


@runtime_checkable
class TransferProgress(Protocol):
    """Receives progress of blob transfers; ``advance`` must be safe to call from several threads."""

    def start(self, label: str, total: int, *, completed: int = 0) -> int:
        """A file of ``total`` bytes starts moving (``completed`` of them are already here); a task id."""
        ...

    def advance(self, task: int, amount: int) -> None:
        """``amount`` more bytes of ``task`` moved."""
        ...

    def finish(self, task: int) -> None:
        """``task`` is over, whether it succeeded or not."""
        ...


class SilentProgress:
    """Reports nothing."""

    def start(self, label: str, total: int, *, completed: int = 0) -> int:
        return IGNORED

    def advance(self, task: int, amount: int) -> None:
        pass

    def finish(self, task: int) -> None:
        pass


class RichProgress:
    """Bars on stderr (or ``console``) for files of at least ``min_bytes``.

    The live display starts with the first large file and stops when the last active one finishes, so
    nothing keeps redrawing between transfers.
    """

    def __init__(self, *, min_bytes: int = LARGE_FILE_BYTES, console: Console | None = None) -> None:
        self.min_bytes = min_bytes
        self._console = console
        self._lock = threading.Lock()
        self._display: Progress | None = None
        self._active = 0

    def start(self, label: str, total: int, *, completed: int = 0) -> int:
        if total < self.min_bytes:
            return IGNORED
        with self._lock:
            if self._display is None:
                self._display = self._new_display()
                self._display.start()
            self._active += 1
            return int(self._display.add_task(label, total=total, completed=completed))

    def advance(self, task: int, amount: int) -> None:
        display = self._display
        if task != IGNORED and display is not None:
            display.advance(TaskID(task), amount)

    def finish(self, task: int) -> None:
        if task == IGNORED:
            return
        with self._lock:
            self._active -= 1
            if self._active == 0 and self._display is not None:
                self._display.stop()
                self._display = None

    def _new_display(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self._console or Console(stderr=True),
        )


def stderr_is_terminal() -> bool:
    stream = sys.stderr
    return stream is not None and stream.isatty()


def resolve_progress(setting: bool | TransferProgress | None) -> TransferProgress:
    """The reporter for ``Registry(progress=setting)``.

    ``None``: bars on stderr when stderr is a terminal, else silent. ``True``: bars on stderr.
    ``False``: silent. Anything else is used as the reporter itself.
    """
    if setting is None:
        setting = stderr_is_terminal()
    if setting is True:
        return RichProgress()
    if setting is False:
        return SilentProgress()
    return setting
