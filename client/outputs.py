"""Writing a new output folder all at once: a temporary folder beside it, made durable, then renamed into
place; and writing its large files front to back without going through the page cache where possible."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from deltareg.client.errors import InvalidInput, InvalidModel

T = TypeVar("T")

# O_DIRECT needs the buffer address, the file offset and the length of each write aligned to the
# filesystem's logical block size; 4096 covers every Linux block device in use.
DIRECT_ALIGN = 4096
# An OutputFile's staging buffer (a multiple of DIRECT_ALIGN): each direct write hands the device this much.
STAGE_BYTES = 8 << 20
# OutputFile.write hands pieces from this size on to the disk from where they lie in memory, when they lie
# right (see there); smaller ones are staged, which costs a copy but saves a write of their own.
DIRECT_FROM = 1 << 20
# The most one buffered write() call hands the kernel. A larger write lets the filesystem put it in
# page-cache folios of 2 MiB or more, and on VMs that report free memory to their host in 2 MiB blocks
# those are the blocks handed back, so each costs the host a fault per page: on a 2-core bench VM, 494 MB
# written in 2 MiB calls took 4.6 s, in 1 MiB calls 0.22 s. Elsewhere 1 MiB calls cost nothing measurable.
WRITE_CHUNK = 1 << 20


def refuse_existing_output(output: Path) -> None:
    """An output must be new, or an empty folder (which the caller may have made for us)."""
    if output.is_dir() and not any(output.iterdir()):
        return
    if output.exists() or output.is_symlink():
        raise InvalidInput(f"{output}: already exists and is not an empty folder; choose a new output path")


def write_atomically(output: Path, write: Callable[[Path], T], *, replace: bool = False) -> T:
    """Run ``write`` on a temporary folder beside ``output`` and rename it to ``output`` if it returns;
    if it raises, remove the temporary folder, so ``output`` never exists half-written.

    Everything written is flushed to the disk before the rename, and the rename itself after it: after a
    crash or a power cut, ``output`` is either absent or complete (without the flush, the rename could
    reach the disk before the files' data, leaving a folder of empty or partly written files).

    An existing ``output`` must be an empty folder, unless ``replace``: then it is removed, whatever it
    holds, once the new folder is complete."""
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.parent / f".{output.name}.tmp-{secrets.token_hex(6)}"
    temp.mkdir()
    try:
        result = write(temp)
        sync_tree(temp)
        if replace and output.exists():
            shutil.rmtree(output)
        elif output.is_dir():
            output.rmdir()  # an empty folder the caller made for us; a non-empty one makes this fail
        temp.rename(output)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    sync_path(output.parent)
    return result


def sync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (files first, each folder after its contents)."""
    for parent, _, files in os.walk(folder, topdown=False):
        for name in files:
            sync_path(Path(parent, name))
        sync_path(Path(parent))


def sync_path(path: Path) -> None:
    """fsync one file or folder (not following a symlink: a link's target is not ours to flush)."""
    if path.is_symlink():
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputFile:
    """A new file written front to back, with O_DIRECT where the filesystem takes it.

    A model written file to file is gigabytes that nothing reads back soon; written through the page
    cache, each of its pages must first be allocated and filled, and on VMs that hand free memory back to
    their host every such page is also a host fault (2.2 GB took 3.5-5 s on the 2-core bench VM, against
    about 1.3 s with O_DIRECT, flush to the disk included). With O_DIRECT the bytes go through a staging
    buffer to the disk in aligned writes of ``STAGE_BYTES``; the last, partial one is padded and the file
    cut back to its size. Where O_DIRECT is refused (at open, or by a write: some filesystems only say so
    then), the file carries on through the page cache in calls of at most ``WRITE_CHUNK``.

    Used from one thread at a time. ``size`` counts every byte handed over, staged or written.
    ``direct=False`` goes through the page cache from the start."""

    def __init__(self, path: Path, *, direct: bool = True) -> None:
        self.path = path
        self.size = 0
        self._fd, self.direct = _create(path, direct=direct)
        self._stage = mmap.mmap(-1, STAGE_BYTES)  # anonymous: page-aligned, as O_DIRECT needs
        self._staged = 0

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._release()  # the file is being given up: what is staged need not be written

    def write(self, data: memoryview) -> None:
        """Append ``data`` (the caller may reuse its memory once this returns).

        With O_DIRECT, bytes are copied into the staging buffer, except when ``data`` lies in memory at
        the same offset modulo ``DIRECT_ALIGN`` as it goes in the file (``aligned_offset`` helps callers
        place it so): then all but its first and last few KiB are written from where they are."""
        if not self.direct:
            self._flush_stage()
            self._write_through_cache(data)
            self.size += len(data)
            return
        head = -self.size % DIRECT_ALIGN  # bytes up to the next aligned file offset
        middle = (len(data) - head) // DIRECT_ALIGN * DIRECT_ALIGN
        if middle < DIRECT_FROM or _address(data) % DIRECT_ALIGN != self.size % DIRECT_ALIGN:
            self._stage_bytes(data)
            return
        self._stage_bytes(data[:head])
        self._flush_stage()  # staged bytes now end on an aligned offset: no padding
        self._write_direct(data[head : head + middle], keep=middle)
        self.size += middle
        self._stage_bytes(data[head + middle :])

    def _stage_bytes(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            count = min(len(data) - done, STAGE_BYTES - self._staged)
            self._stage[self._staged : self._staged + count] = data[done : done + count]
            self._staged += count
            self.size += count
            done += count
            self._flush_stage(only_when_full=True)

    def copy_from(self, src_fd: int, offset: int, length: int, digest: hashlib._Hash | None = None) -> None:
        """Append ``length`` bytes read at ``offset`` of ``src_fd``, read straight into the staging buffer
        and fed to ``digest`` too when given."""
        view = memoryview(self._stage)
        end = offset + length
        while offset < end:
            room = view[self._staged : min(STAGE_BYTES, self._staged + end - offset)]
            count = os.preadv(src_fd, [room], offset)
            if count == 0:
                raise InvalidModel(f"unexpected end of file at offset {offset} (was the file changed?)")
            if digest is not None:
                digest.update(room[:count])
            self._staged += count
            self.size += count
            offset += count
            self._flush_stage(only_when_full=self.direct)

    def close(self) -> None:
        """Write what is staged and close the file (``write_atomically`` flushes it to the disk)."""
        if self._fd < 0:
            return
        try:
            self._flush_stage()
        finally:
            self._release()

    def _release(self) -> None:
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        with contextlib.suppress(BufferError):  # a view still held (by a traceback): freed with it
            self._stage.close()

    def _flush_stage(self, *, only_when_full: bool = False) -> None:
        if self._staged == 0 or (only_when_full and self._staged < STAGE_BYTES):
            return
        staged = memoryview(self._stage)[: self._staged]
        if not self.direct:
            self._write_through_cache(staged)
        else:
            padded = -(-self._staged // DIRECT_ALIGN) * DIRECT_ALIGN  # a partial stage only comes last
            self._stage[self._staged : padded] = bytes(padded - self._staged)
            self._write_direct(memoryview(self._stage)[:padded], keep=self._staged)
            if padded != self._staged:
                os.ftruncate(self._fd, self.size)
        staged.release()
        self._staged = 0

    def _write_direct(self, data: memoryview, keep: int) -> None:
        """Write ``data`` with O_DIRECT (of which ``keep`` bytes are the file's, the rest padding); if the
        filesystem refuses, or a short write leaves the offset unaligned, go on through the page cache."""
        done = 0
        while done < keep:
            try:
                count = os.write(self._fd, data[done:])
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                count = 0
            if count == 0 or count % DIRECT_ALIGN:
                self._stop_direct()
                self._write_through_cache(data[done + count : keep])
                return
            done += count

    def _write_through_cache(self, data: memoryview) -> None:
        for start in range(0, len(data), WRITE_CHUNK):
            piece = data[start : start + WRITE_CHUNK]
            while len(piece):
                piece = piece[os.write(self._fd, piece) :]

    def _stop_direct(self) -> None:
        """Go on through the page cache, from the file's current end."""
        import fcntl  # only reached where O_DIRECT exists (Linux); Windows has no fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
        self.direct = False


def aligned_offset(address: int, file_offset: int) -> int:
    """Where to put bytes, from ``address`` on, so that ``OutputFile.write`` can hand them to the disk
    without copying them when they go at ``file_offset`` of the file: less than ``DIRECT_ALIGN``."""
    return (file_offset - address) % DIRECT_ALIGN


def _address(data: memoryview) -> int:
    """The address of ``data``'s first byte (-1, matching no offset, if it cannot be had)."""
    if data.readonly or not data.c_contiguous or not len(data):
        return -1
    anchor = ctypes.c_char.from_buffer(data)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # releases its hold on the buffer


_O_DIRECT: int = getattr(os, "O_DIRECT", 0)  # Linux only; elsewhere every OutputFile goes through the cache


def _create(path: Path, *, direct: bool) -> tuple[int, bool]:
    """Open ``path`` for writing, new or truncated; with O_DIRECT if asked and the filesystem takes it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    if direct and _O_DIRECT:
        try:
            return os.open(path, flags | _O_DIRECT, 0o666), True
        except OSError as error:
            if error.errno != errno.EINVAL:  # EINVAL: this filesystem does not do O_DIRECT
                raise
    return os.open(path, flags, 0o666), False
