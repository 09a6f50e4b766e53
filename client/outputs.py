"""Writing a new output folder all at once: a temporary folder beside it, renamed into place at the end."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from deltareg.client.errors import InvalidInput

T = TypeVar("T")


def refuse_existing_output(output: Path) -> None:
    """An output must be new, or an empty folder (which the caller may have made for us)."""
    if output.is_dir() and not any(output.iterdir()):
        return
    if output.exists() or output.is_symlink():
        raise InvalidInput(f"{output}: already exists and is not an empty folder; choose a new output path")


def write_atomically(output: Path, write: Callable[[Path], T]) -> T:
    """Run ``write`` on a temporary folder beside ``output`` and rename it to ``output`` if it returns;
    if it raises, remove the temporary folder, so ``output`` never exists half-written."""
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.parent / f".{output.name}.tmp-{secrets.token_hex(6)}"
    temp.mkdir()
    try:
        result = write(temp)
        if output.is_dir():
            output.rmdir()  # an empty folder the caller made for us; a non-empty one makes this fail
        temp.rename(output)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return result
