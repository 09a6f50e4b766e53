"""OutputFile (O_DIRECT with a staging buffer, or the page cache), and the flush to disk before the rename
of write_atomically and of the pull cache.

Real files on the test's own filesystem; the only stand-ins are OS calls made to fail or recorded
(``os.open``/``os.write`` refusing O_DIRECT as some filesystems do, ``os.fsync`` observed)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deltareg.client.cache import VersionCache, VersionRecord, copy_folder, verify_folder
from deltareg.client.manifest import BaseModelRef, FileEntry, Manifest
from deltareg.client.outputs import (
    DIRECT_ALIGN,
    DIRECT_FROM,
    STAGE_BYTES,
    OutputFile,
    aligned_offset,
    write_atomically,
)

O_DIRECT = getattr(os, "O_DIRECT", 0)
needs_o_direct = pytest.mark.skipif(not O_DIRECT, reason="O_DIRECT is Linux only")

# Appends of awkward sizes: empty, around the alignment, around and over a whole stage.
SIZES = [0, 1, DIRECT_ALIGN - 1, DIRECT_ALIGN, DIRECT_ALIGN + 1, STAGE_BYTES - 3, 7, STAGE_BYTES + 5, 123_457]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.bin"
    path.write_bytes(random.Random(5).randbytes(2 * STAGE_BYTES + 999))
    return path


def _append_mixed(out: OutputFile, source: Path) -> tuple[bytes, list[tuple[str, str]]]:
    """Append SIZES pieces, alternately from memory and copied from ``source``; return the bytes expected
    and (digest of each copy, expected digest)."""
    data = source.read_bytes()
    expected, digests = bytearray(), []
    rng = random.Random(11)
    with open(source, "rb") as src:
        for number, size in enumerate(SIZES):
            offset = rng.randrange(0, len(data) - size + 1)
            piece = data[offset : offset + size]
            if number % 2:
                digest = hashlib.sha256()
                out.copy_from(src.fileno(), offset, size, digest)
                digests.append((digest.hexdigest(), hashlib.sha256(piece).hexdigest()))
            else:
                out.write(memoryview(bytes(piece)))
            expected += piece
    return bytes(expected), digests


@needs_o_direct
def test_o_direct_output_has_exactly_the_bytes_appended(tmp_path: Path, source: Path) -> None:
    path = tmp_path / "out.bin"
    with OutputFile(path) as out:
        assert out.direct, "this filesystem refused O_DIRECT; the apply tests would not exercise it"
        expected, digests = _append_mixed(out, source)
        assert out.size == len(expected)
        assert out.direct  # no write fell back
    assert path.read_bytes() == expected  # the padded last stage was cut back to the size
    assert all(got == want for got, want in digests)


def _placed(data: bytes, file_offset: int) -> memoryview:
    """``data`` in memory at the same offset modulo DIRECT_ALIGN as ``file_offset``."""
    room = bytearray(len(data) + DIRECT_ALIGN)
    anchor = ctypes.c_char.from_buffer(room)
    shift = aligned_offset(ctypes.addressof(anchor), file_offset)
    del anchor
    room[shift : shift + len(data)] = data
    return memoryview(room)[shift : shift + len(data)]


@needs_o_direct
def test_pieces_placed_like_the_file_go_to_the_disk_without_a_copy(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What apply does with merged tensors: read where they will lie in the file, they are written from
    there (all but their unaligned ends), and the file is the same as if they had been staged."""
    real_write = os.write
    writes: list[int] = []

    def recording_write(fd: int, data: Any) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", recording_write)
    rng = random.Random(3)
    path = tmp_path / "out.bin"
    expected = bytearray()
    with OutputFile(path) as out, open(source, "rb") as src:
        for size in (5, 3 * DIRECT_FROM + 77, 2 * STAGE_BYTES + 1, DIRECT_FROM + DIRECT_ALIGN):
            piece = rng.randbytes(size)
            out.write(_placed(piece, out.size))
            expected += piece
            out.copy_from(src.fileno(), 10, 999)
            expected += source.read_bytes()[10:1009]
        unplaced = rng.randbytes(DIRECT_FROM * 2)
        out.write(memoryview(unplaced))  # not placed: staged, as before
        expected += unplaced
    monkeypatch.undo()
    assert path.read_bytes() == bytes(expected)
    # the first placed piece's aligned middle went as one write of its own
    head = -5 % DIRECT_ALIGN
    assert (3 * DIRECT_FROM + 77 - head) // DIRECT_ALIGN * DIRECT_ALIGN in writes
    assert all(size % DIRECT_ALIGN == 0 for size in writes)


def test_page_cache_output_has_exactly_the_bytes_appended(tmp_path: Path, source: Path) -> None:
    path = tmp_path / "out.bin"
    with OutputFile(path, direct=False) as out:
        assert not out.direct
        expected, digests = _append_mixed(out, source)
    assert path.read_bytes() == expected
    assert all(got == want for got, want in digests)


@needs_o_direct
def test_a_filesystem_refusing_o_direct_at_open_gets_the_page_cache(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refusing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # as tmpfs before Linux 6.6
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    path = tmp_path / "out.bin"
    with OutputFile(path) as out:
        assert not out.direct
        expected, _ = _append_mixed(out, source)
    monkeypatch.undo()
    assert path.read_bytes() == expected


@needs_o_direct
def test_a_filesystem_refusing_o_direct_writes_midway_loses_nothing(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some filesystems take O_DIRECT at open and refuse it at the first write: the file goes on through
    the page cache from where it was, the bytes already written direct kept."""
    import fcntl

    real_write = os.write
    direct_writes = []

    def refusing_after_one(fd: int, data: Any) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            direct_writes.append(len(data))
            if len(direct_writes) > 1:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refusing_after_one)
    path = tmp_path / "out.bin"
    with OutputFile(path) as out:
        expected, _ = _append_mixed(out, source)
        assert not out.direct
    monkeypatch.undo()
    assert direct_writes[0] == STAGE_BYTES  # one whole stage went direct before the refusal
    assert path.read_bytes() == expected


@needs_o_direct
def test_a_failure_while_writing_does_not_write_what_is_staged(tmp_path: Path) -> None:
    """The file is about to be removed: flushing the stage would only waste time (or, after a failed
    write, raise again over the real error)."""
    path = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="the apply failed"), OutputFile(path) as out:
        out.write(memoryview(b"x" * 100))
        raise RuntimeError("the apply failed")
    assert path.stat().st_size == 0
    with OutputFile(tmp_path / "ok.bin") as out:
        out.write(memoryview(b"x" * 100))
    assert (tmp_path / "ok.bin").read_bytes() == b"x" * 100


def test_copy_from_a_file_that_ends_early_is_an_error(tmp_path: Path, source: Path) -> None:
    with OutputFile(tmp_path / "out.bin") as out, open(source, "rb") as src:
        size = source.stat().st_size
        with pytest.raises(Exception, match="unexpected end of file"):
            out.copy_from(src.fileno(), size - 10, 20)


def _fsync_recorder(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record what is fsynced (as the path of the descriptor) and when the rename happens."""
    events: list[str] = []
    real_fsync: Callable[[int], None] = os.fsync
    real_rename = Path.rename
    real_replace = os.replace

    def fsync(fd: int) -> None:
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def rename(self: Path, target: Any) -> Path:
        events.append(f"rename {self} -> {target}")
        return real_rename(self, target)

    def replace(source: Any, target: Any) -> None:
        events.append(f"rename {source} -> {target}")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _split_at_the_rename(events: list[str]) -> tuple[set[str], list[str]]:
    """What was fsynced before the one rename, and after it."""
    renames = [i for i, event in enumerate(events) if event.startswith("rename")]
    assert len(renames) == 1
    return set(events[: renames[0]]), events[renames[0] + 1 :]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name descriptors")
def test_write_atomically_flushes_every_file_and_folder_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = _fsync_recorder(monkeypatch)
    output = tmp_path / "parent" / "model"
    temps: list[Path] = []

    def write(temp: Path) -> None:
        temps.append(temp)
        (temp / "sub").mkdir()
        (temp / "a.safetensors").write_bytes(b"a" * 5000)
        (temp / "sub" / "b.json").write_text("{}")

    write_atomically(output, write)
    before, after = _split_at_the_rename(events)
    temp = temps[0]
    assert before == {str(temp / "a.safetensors"), str(temp / "sub" / "b.json"), str(temp / "sub"), str(temp)}
    assert after == [str(output.parent)]  # the rename itself reaches the disk
    assert (output / "sub" / "b.json").read_text() == "{}"


def _pulled_version() -> tuple[bytes, VersionRecord]:
    """A one-file version's bytes and record."""
    data = random.Random(9).randbytes(70_000)
    manifest = Manifest(
        kind="lora",
        files=[
            FileEntry(
                path="weights.safetensors",
                digest=f"sha256:{hashlib.sha256(data).hexdigest()}",
                size=len(data),
            )
        ],
        base=BaseModelRef(fingerprint="tmv1:" + "ab" * 32),
    )
    record = VersionRecord(repo="acme/durable", number=1, digest=manifest.digest, manifest=manifest)
    return data, record


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name descriptors")
def test_a_pulled_version_is_on_the_disk_before_it_enters_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, record = _pulled_version()
    cache = VersionCache(tmp_path / "cache")
    staging: list[Path] = []

    def fetch(entry: FileEntry, dest: Path) -> None:
        staging.append(dest.parent)
        dest.write_bytes(data)

    events = _fsync_recorder(monkeypatch)
    folder = cache.install(record, fetch)
    before, after = _split_at_the_rename(events)
    assert before == {
        str(staging[0] / "weights.safetensors"),
        str(staging[0] / ".deltareg.json"),
        str(staging[0]),
    }
    assert after == [str(cache.root)]
    assert verify_folder(folder) == record

    events.clear()
    copied = copy_folder(folder, tmp_path / "out" / "adapter")  # pull -o
    before, after = _split_at_the_rename(events)
    assert {Path(path).name for path in before} >= {"weights.safetensors", ".deltareg.json"}
    assert after == [str(tmp_path / "out")]
    assert verify_folder(copied) == record


def test_a_damaged_cached_version_is_replaced_by_the_next_install(tmp_path: Path) -> None:
    data, record = _pulled_version()
    cache = VersionCache(tmp_path / "cache")

    def fetch(entry: FileEntry, dest: Path) -> None:
        dest.write_bytes(data)

    folder = cache.install(record, fetch)
    (folder / "weights.safetensors").write_bytes(data[:100])  # as a crash or a full disk might leave it
    (folder / "stray.txt").write_text("not the version's")
    assert cache.lookup(record.digest) is None

    assert cache.install(record, fetch) == folder
    assert cache.lookup(record.digest) == folder
    assert verify_folder(folder) == record
    assert sorted(p.name for p in cache.root.iterdir()) == [folder.name]  # nothing left beside it
    assert not (folder / "stray.txt").exists()
