"""The base fingerprint ``tmv1``: the identity of a model's weights, whatever their files look like.

- tensor digest = sha256 over the UTF-8 line ``"{dtype}|{d0,d1,...}\\n"`` (safetensors dtype name, shape
  joined by commas, empty for scalars) followed by the tensor's raw little-endian bytes;
- fingerprint = ``"tmv1:"`` + sha256 over the lines ``"{name}\\t{tensor digest hex}\\n"``, names sorted by
  their UTF-8 bytes.

File names, sharding, header order and metadata do not matter. Tied weights in memory (several names for
one storage) count once, under the first name in state-dict order, which is what ``save_pretrained``
writes, so a model in memory and its saved folder get the same value.

Speed: files are memory-mapped once each and every tensor is hashed straight from the mapping (no
copies) on a thread pool, largest tensors first; hashlib releases the GIL while hashing large buffers, so
the pool uses every core. A single tensor cannot be split (its digest is one sha256), so the largest
tensor bounds the wall time from below. Digests of local files are cached per file, keyed by path, size,
mtime, ctime, inode and device, so hashing an unchanged model again reads nothing but ``stat``.

Tensor bytes are hashed as stored in memory, which is little-endian on every platform torch supports for
this purpose (x86-64, ARM64); safetensors files are little-endian by definition.
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import re
import tempfile
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from deltareg.client.errors import InvalidModel
from deltareg.client.weights import (
    SAFETENSORS_DTYPES,
    SafetensorsHeader,
    find_weight_files,
    read_header,
    reader_of,
)

if TYPE_CHECKING:
    import torch

SCHEME = "tmv1"
FINGERPRINT_PATTERN = re.compile(r"tmv1:[0-9a-f]{64}")
TENSOR_DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")
CACHE_FORMAT = "deltareg.fingerprint-cache.v1"

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class TensorInfo:
    """What the fingerprint knows about one tensor."""

    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    digest: str  # tensor digest, 64 hex chars


@dataclass(frozen=True)
class ModelFingerprint:
    value: str  # "tmv1:<64 hex>"
    tensors: Mapping[str, TensorInfo]  # every tensor counted, sorted by name


def is_fingerprint(text: str) -> bool:
    """Whether ``text`` is a well-formed base fingerprint (``tmv1:`` and 64 lower-case hex digits)."""
    return FINGERPRINT_PATTERN.fullmatch(text) is not None


# --------------------------------------------------------------------------------------------------
# The format


def tensor_digest(dtype: str, shape: Sequence[int], data: Any) -> str:
    """The tensor digest of ``data`` (a bytes-like object holding the raw little-endian tensor bytes)."""
    hasher = tensor_hasher(dtype, shape)
    hasher.update(data)
    return hasher.hexdigest()


def tensor_hasher(dtype: str, shape: Sequence[int]) -> hashlib._Hash:
    """A sha256 that has taken the tensor line: fed the tensor's bytes (in pieces if need be), its
    ``hexdigest()`` is the tensor digest."""
    return hashlib.sha256(_tensor_line(dtype, shape))


def _tensor_line(dtype: str, shape: Sequence[int]) -> bytes:
    return f"{dtype}|{','.join(map(str, shape))}\n".encode()


def combine(tensors: Mapping[str, TensorInfo]) -> str:
    """The fingerprint of a set of named tensor digests."""
    hasher = hashlib.sha256()
    for name in _sorted_names(tensors):
        hasher.update(f"{name}\t{tensors[name].digest}\n".encode())
    return f"{SCHEME}:{hasher.hexdigest()}"


def _sorted_names(tensors: Iterable[str]) -> list[str]:
    names = list(tensors)
    for name in names:
        _check_name(name)
    return sorted(names, key=lambda n: n.encode("utf-8"))


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise InvalidModel(f"tensor names must be non-empty strings, got {name!r}")
    if "\t" in name or "\n" in name:
        raise InvalidModel(f"tensor name {name!r} contains a tab or newline, which the fingerprint forbids")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidModel(f"tensor name {name!r} is not valid Unicode") from None


def fingerprint_of(tensors: Mapping[str, TensorInfo]) -> ModelFingerprint:
    """The fingerprint of a whole model's tensor digests, with the digests sorted by name."""
    value = combine(tensors)
    return ModelFingerprint(value, {name: tensors[name] for name in _sorted_names(tensors)})


# --------------------------------------------------------------------------------------------------
# Parallel hashing


@dataclass(frozen=True)
class _Job(Generic[K]):
    key: K
    nbytes: int
    run: Callable[[], TensorInfo]


def _run_largest_first(jobs: list[_Job[K]], workers: int | None) -> dict[K, TensorInfo]:
    """Run the jobs on a thread pool, largest first so that the big tensors do not end up last."""
    workers = _worker_count(workers)
    ordered = sorted(jobs, key=lambda job: job.nbytes, reverse=True)
    if workers == 1 or len(ordered) <= 1:
        return {job.key: job.run() for job in ordered}
    # cancel_futures: after a failure, the queued jobs are dropped instead of hashed for nothing.
    pool = ThreadPoolExecutor(max_workers=min(workers, len(ordered)), thread_name_prefix="fingerprint")
    try:
        futures: list[tuple[K, Future[TensorInfo]]] = [(job.key, pool.submit(job.run)) for job in ordered]
        return {key: future.result() for key, future in futures}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_count(workers: int | None) -> int:
    if workers is None:
        return os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return workers


# --------------------------------------------------------------------------------------------------
# Files


def fingerprint_path(
    model: str | os.PathLike[str],
    *,
    cache: FingerprintCache | None = None,
    use_cache: bool = True,
    workers: int | None = None,
) -> ModelFingerprint:
    """The fingerprint of a model on disk: one ``.safetensors`` file or a folder of shards.

    Unchanged files are taken from ``cache`` (``FingerprintCache.default()`` when not given) unless
    ``use_cache`` is false. ``workers`` threads hash in parallel (default: one per CPU).
    """
    files = find_weight_files(model)
    store = _cache_to_use(cache, use_cache)
    per_file = _digests_of_files(files, store, workers)
    return fingerprint_of(_merge_shards(per_file))


def tensor_digests(
    model: str | os.PathLike[str],
    names: Iterable[str],
    *,
    cache: FingerprintCache | None = None,
    use_cache: bool = True,
    workers: int | None = None,
) -> dict[str, TensorInfo]:
    """Digests of the named tensors only, hashing nothing else (a cached file is not hashed at all).

    Raises ``InvalidModel`` if the model lacks one of the names.
    """
    wanted = set(names)
    files = find_weight_files(model)
    store = _cache_to_use(cache, use_cache)
    found: dict[str, TensorInfo] = {}
    owners: dict[str, Path] = {}
    uncached: list[Path] = []
    for path in files:
        cached = store.get(FileKey.of(path)) if store is not None else None
        if cached is None:
            uncached.append(path)
        else:
            _add_unique(found, {n: i for n, i in cached.items() if n in wanted}, path, owners)
    hashed = _hash_files(uncached, workers, only=wanted)
    for path, tensors in hashed.items():
        _add_unique(found, tensors, path, owners)
    missing = wanted - found.keys()
    if missing:
        shown = ", ".join(repr(n) for n in sorted(missing)[:5]) + (", ..." if len(missing) > 5 else "")
        raise InvalidModel(f"{model}: the model has no tensor named {shown}")
    return {name: found[name] for name in _sorted_names(found)}


def _cache_to_use(cache: FingerprintCache | None, use_cache: bool) -> FingerprintCache | None:
    if not use_cache:
        return None
    return cache if cache is not None else FingerprintCache.default()


@dataclass(frozen=True)
class CachedFiles:
    """What a cache knows of some weight files: every file's key as it was looked up, and the tensor
    digests of the files it holds (a file missing from ``digests`` must be hashed)."""

    keys: dict[Path, FileKey]
    digests: dict[Path, dict[str, TensorInfo]]


def cached_file_digests(
    files: Iterable[Path], cache: FingerprintCache | None, *, use_cache: bool = True
) -> CachedFiles:
    """Look every file up in ``cache`` (``FingerprintCache.default()`` when not given; none at all unless
    ``use_cache``). The keys are taken now, before any hashing: see ``remember_file_digests``."""
    store = _cache_to_use(cache, use_cache)
    keys = {path: FileKey.of(path) for path in files}
    digests = {}
    for path, key in keys.items():
        cached = store.get(key) if store is not None else None
        if cached is not None:
            digests[path] = cached
    return CachedFiles(keys, digests)


def remember_file_digests(
    cache: FingerprintCache | None,
    path: Path,
    key: FileKey,
    tensors: Mapping[str, TensorInfo],
    *,
    use_cache: bool = True,
) -> None:
    """Cache the digests of every tensor of ``path``, hashed from the file ``key`` described before the
    hashing began. A file that changed since is not cached: its digests may mix two versions."""
    store = _cache_to_use(cache, use_cache)
    if store is not None and FileKey.of(path) == key:
        store.put(key, tensors)


def _digests_of_files(
    files: list[Path], cache: FingerprintCache | None, workers: int | None
) -> dict[Path, dict[str, TensorInfo]]:
    known = cached_file_digests(files, cache, use_cache=cache is not None)
    per_file = dict(known.digests)
    hashed = _hash_files([path for path in files if path not in per_file], workers)
    for path, tensors in hashed.items():
        per_file[path] = tensors
        remember_file_digests(cache, path, known.keys[path], tensors, use_cache=cache is not None)
    return {path: per_file[path] for path in files}


def _merge_shards(per_file: Mapping[Path, Mapping[str, TensorInfo]]) -> dict[str, TensorInfo]:
    merged: dict[str, TensorInfo] = {}
    owners: dict[str, Path] = {}
    for path, tensors in per_file.items():
        _add_unique(merged, tensors, path, owners)
    return merged


def _add_unique(
    into: dict[str, TensorInfo], tensors: Mapping[str, TensorInfo], path: Path, owners: dict[str, Path]
) -> None:
    for name, info in tensors.items():
        if name in into:
            other = owners.get(name)
            where = f"both {other.name} and {path.name}" if other else f"{path.name} and another shard"
            raise InvalidModel(
                f"{path.parent}: tensor {name!r} is in {where}; a model names each tensor once"
            )
        into[name] = info
        owners[name] = path


def _hash_files(
    files: list[Path], workers: int | None, *, only: set[str] | None = None
) -> dict[Path, dict[str, TensorInfo]]:
    """Hash the tensors of several files in one pool, so that small shards do not idle the cores."""
    if not files:
        return {}
    with ExitStack() as stack:
        jobs: list[_Job[tuple[Path, str]]] = []
        order: dict[Path, list[str]] = {}
        for path in files:
            header, view, release = stack.enter_context(_mapped(path))
            names = [n for n in header.tensors if only is None or n in only]
            order[path] = names
            jobs += [_file_job(path, header, view, release, name) for name in names]
        results = _run_largest_first(jobs, workers)
    return {path: {name: results[(path, name)] for name in names} for path, names in order.items()}


def _file_job(
    path: Path, header: SafetensorsHeader, view: memoryview, release: Callable[[int, int], None], name: str
) -> _Job[tuple[Path, str]]:
    entry = header.tensors[name]

    def run() -> TensorInfo:
        # The slice is released at once: the mapping cannot be closed while a slice of it is alive.
        with view[entry.start : entry.end] as data:
            digest = tensor_digest(entry.dtype, entry.shape, data)
        release(entry.start, entry.end)
        return TensorInfo(entry.dtype, entry.shape, digest)

    return _Job((path, name), entry.nbytes, run)


@contextmanager
def _mapped(path: Path) -> Iterator[tuple[SafetensorsHeader, memoryview, Callable[[int, int], None]]]:
    """A file's validated header, a zero-copy view of the whole file and a ``release(start, end)`` that
    unmaps the pages of a hashed range from this process (see ``_releaser``)."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise InvalidModel(f"{path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        header = read_header(reader_of(handle), size, source=str(path))
        # A valid header means size >= 10, so the mapping is never empty (mmap refuses empty files).
        mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    try:
        if len(mapping) != size:  # slices past the end would silently come back short
            raise InvalidModel(f"{path}: the file changed size while being read")
        sequential = getattr(mmap, "MADV_SEQUENTIAL", None)  # a read-ahead hint, absent on Windows
        if sequential is not None:
            mapping.madvise(sequential)
        with memoryview(mapping) as view:
            yield header, view, _releaser(mapping)
    finally:
        mapping.close()


def _releaser(mapping: mmap.mmap) -> Callable[[int, int], None]:
    """``release(start, end)``: drop the whole pages inside ``[start, end)`` from the process's mapping.

    Without it every hashed page stays mapped, and so counted in the process's RSS, until the file is
    closed: the whole model at once, since all files are mapped together. MADV_DONTNEED on a read-only
    shared file mapping only unmaps the pages here; they stay in the page cache, and a later read of the
    same range (a tensor sharing an edge page) maps them again with the same bytes. Where the option does
    not exist (Windows), nothing is released.
    """
    dontneed = getattr(mmap, "MADV_DONTNEED", None)
    if dontneed is None:
        return lambda start, end: None
    page = mmap.PAGESIZE

    def release(start: int, end: int) -> None:
        first = -(-start // page) * page  # whole pages only: the edge pages may belong to a neighbour
        last = end // page * page
        if last > first:
            mapping.madvise(dontneed, first, last - first)

    return release


# --------------------------------------------------------------------------------------------------
# The cache


@dataclass(frozen=True)
class FileKey:
    """What identifies one version of a local file: if any of these change, the file is hashed again."""

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileKey:
        resolved = Path(path).resolve()
        try:
            st = resolved.stat()
        except OSError as exc:
            raise InvalidModel(f"{path}: cannot read: {exc.strerror or exc}") from None
        return cls(str(resolved), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "ctime_ns": self.ctime_ns,
            "inode": self.inode,
            "device": self.device,
        }


class FingerprintCache:
    """Tensor digests of local safetensors files, one small JSON file per weight file.

    Entries are written to a temporary file and renamed into place, so a crash never leaves a torn entry;
    an entry that cannot be read or does not match its file is ignored (and rewritten). ``hits`` and
    ``misses`` count lookups since construction.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    @classmethod
    def default(cls) -> FingerprintCache:
        """``$DELTAREG_CACHE_DIR/fingerprints``, else ``~/.cache/deltareg/fingerprints``."""
        root = os.environ.get("DELTAREG_CACHE_DIR")
        base = Path(root) if root else Path.home() / ".cache" / "deltareg"
        return cls(base / "fingerprints")

    def entry_path(self, key: FileKey) -> Path:
        """Where the entry for ``key`` lives (named by a hash of the key, so any change misses)."""
        name = hashlib.sha256(json.dumps(key.as_json(), sort_keys=True).encode()).hexdigest()
        return self.directory / f"{name}.json"

    def get(self, key: FileKey) -> dict[str, TensorInfo] | None:
        """The cached tensors of the file ``key`` describes, or None."""
        tensors = self._load(self.entry_path(key), key)
        if tensors is None:
            self.misses += 1
        else:
            self.hits += 1
        return tensors

    def put(self, key: FileKey, tensors: Mapping[str, TensorInfo]) -> None:
        """Store a file's tensors. Best effort: a cache that cannot be written is not an error."""
        entry = {
            "format": CACHE_FORMAT,
            "file": key.as_json(),
            "tensors": {n: [i.dtype, list(i.shape), i.digest] for n, i in tensors.items()},
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        except OSError:
            return
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(entry, handle, separators=(",", ":"))
            os.replace(temp, self.entry_path(key))
        except OSError:
            Path(temp).unlink(missing_ok=True)

    def _load(self, entry_path: Path, key: FileKey) -> dict[str, TensorInfo] | None:
        try:
            entry = json.loads(entry_path.read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT:
            return None
        if entry.get("file") != key.as_json() or not isinstance(entry.get("tensors"), dict):
            return None
        tensors: dict[str, TensorInfo] = {}
        for name, item in entry["tensors"].items():
            info = _info_from_json(item)
            if info is None:
                return None
            tensors[name] = info
        return tensors


def _info_from_json(item: Any) -> TensorInfo | None:
    if not (isinstance(item, list) and len(item) == 3):
        return None
    dtype, shape, digest = item
    if dtype not in SAFETENSORS_DTYPES or not isinstance(digest, str):
        return None
    if not TENSOR_DIGEST_PATTERN.fullmatch(digest):
        return None
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return None
    return TensorInfo(dtype, tuple(shape), digest)


# --------------------------------------------------------------------------------------------------
# State dicts (torch, imported lazily)


def fingerprint_state_dict(
    state: Mapping[str, torch.Tensor], *, workers: int | None = None
) -> ModelFingerprint:
    """The fingerprint of an in-memory state dict; tied weights count once, under their first name."""
    untied = _untie(state)
    jobs = [_tensor_job(name, tensor) for name, tensor in untied.items()]
    return fingerprint_of(_run_largest_first(jobs, workers))


def tensor_digests_of_state_dict(
    state: Mapping[str, torch.Tensor], names: Iterable[str], *, workers: int | None = None
) -> dict[str, TensorInfo]:
    """Digests of the named tensors of a state dict only. Raises ``InvalidModel`` for a missing name."""
    wanted = sorted(set(names))
    missing = [name for name in wanted if name not in state]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise InvalidModel(f"the state dict has no tensor named {shown}")
    jobs = [_tensor_job(name, state[name]) for name in wanted]
    found = _run_largest_first(jobs, workers)
    return {name: found[name] for name in _sorted_names(found)}


def _untie(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop every name whose tensor is exactly an earlier one (same storage, offset, shape, stride, dtype)."""
    import torch

    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple[Any, ...]] = set()
    for name, tensor in state.items():
        _check_name(name)
        if not isinstance(tensor, torch.Tensor):
            raise InvalidModel(f"state dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.device.type == "meta":
            raise InvalidModel(f"tensor {name!r} is on the meta device and has no data to fingerprint")
        # Empty tensors may share a null storage pointer without being the same tensor.
        if tensor.numel() > 0:
            identity = (
                tensor.device,
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tensor.stride(),
                tensor.dtype,
            )
            if identity in seen:
                continue
            seen.add(identity)
        kept[name] = tensor
    return kept


def _tensor_job(name: str, tensor: torch.Tensor) -> _Job[str]:
    dtype = safetensors_dtype(tensor.dtype)
    shape = tuple(tensor.shape)

    def run() -> TensorInfo:
        return TensorInfo(dtype, shape, tensor_digest(dtype, shape, _raw_bytes(tensor)))

    return _Job(name, tensor.numel() * tensor.element_size(), run)


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, without a copy when it is already a contiguous CPU tensor."""
    import torch

    flat = tensor.detach().resolve_conj().resolve_neg()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous().reshape(-1).view(torch.uint8)
    return flat.numpy().data  # a memoryview over the tensor memory


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype; ``InvalidModel`` for dtypes safetensors cannot store."""
    name = _torch_dtype_names().get(dtype)
    if name is None:
        raise InvalidModel(f"tensors of dtype {dtype} cannot be fingerprinted (no safetensors equivalent)")
    return name


@functools.cache
def _torch_dtype_names() -> dict[Any, str]:
    import torch

    # getattr: the float8 and unsigned types only exist in recent torch versions.
    candidates = {
        "float64": "F64",
        "float32": "F32",
        "float16": "F16",
        "bfloat16": "BF16",
        "int64": "I64",
        "int32": "I32",
        "int16": "I16",
        "int8": "I8",
        "uint8": "U8",
        "uint16": "U16",
        "uint32": "U32",
        "uint64": "U64",
        "bool": "BOOL",
        "complex64": "C64",
        "float8_e4m3fn": "F8_E4M3",
        "float8_e5m2": "F8_E5M2",
        "float8_e4m3fnuz": "F8_E4M3FNUZ",
        "float8_e5m2fnuz": "F8_E5M2FNUZ",
        "float8_e8m0fnu": "F8_E8M0",
    }
    return {getattr(torch, attr): name for attr, name in candidates.items() if hasattr(torch, attr)}
