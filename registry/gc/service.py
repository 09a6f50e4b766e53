"""Garbage collection: remove blobs no version references, once they are older than the grace period.

Three sweeps, each safe against pushes running at the same time on any replica:

1. Recorded blobs that no version file references and nobody marked in use (upload, upload plan) within
   the grace period. Each one in its own transaction: delete the row (one statement re-checking both
   conditions), delete the object, commit. The object goes while the row's deletion is still
   uncommitted, so an upload of the same bytes cannot re-record the row and find the old object in
   between; if the commit then fails, the row stays without an object, which the upload plan and the
   version commit both detect (they check the store too), so the client uploads again.
2. Store objects without a row (uploads that were stored but never recorded) last written before the
   grace period: claimed with a placeholder row while the object is deleted, then rolled back.
3. Upload leftovers (temporary files, staging objects, unfinished multipart uploads) started before the
   grace period (``BlobStore.clean_staging``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice
from typing import Any

from sqlalchemy.exc import IntegrityError

from deltareg.registry.db import Database
from deltareg.registry.gc.repository import BATCH, GcRepository
from deltareg.registry.models import utcnow
from deltareg.registry.storage import BlobStore
from deltareg.registry.storage.base import StoredBlob

logger = logging.getLogger("deltareg.registry.gc")


@dataclass(frozen=True)
class Removed:
    name: str
    size: int


@dataclass
class GcReport:
    """What one run removed (or, in a dry run, would remove)."""

    dry_run: bool
    grace_seconds: float
    blobs: list[Removed] = field(default_factory=list)  # unreferenced recorded blobs
    strays: list[Removed] = field(default_factory=list)  # store objects that were never recorded
    # How many upload leftovers were removed; None in a dry run (the store cannot list them).
    uploads: int | None = None

    @property
    def removed_bytes(self) -> int:
        """Bytes of blobs and stray objects (upload leftovers are not counted)."""
        return sum(item.size for item in (*self.blobs, *self.strays))

    def to_json(self) -> dict[str, Any]:
        def items(removed: list[Removed]) -> list[dict[str, Any]]:
            return [{"name": item.name, "size": item.size} for item in removed]

        return {
            "dry_run": self.dry_run,
            "grace_seconds": self.grace_seconds,
            "blobs": items(self.blobs),
            "strays": items(self.strays),
            "uploads": self.uploads,
            "removed_bytes": self.removed_bytes,
        }


class GarbageCollector:
    """Collects the garbage of one registry (database + store); safe to run on several replicas at once."""

    def __init__(
        self,
        database: Database,
        store: BlobStore,
        *,
        grace: timedelta,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.database = database
        self.store = store
        self.grace = grace
        self.clock = clock

    def run(self, *, dry_run: bool = False) -> GcReport:
        """One collection; with ``dry_run`` nothing is removed and the report lists the candidates."""
        cutoff = self.clock() - self.grace
        report = GcReport(dry_run=dry_run, grace_seconds=self.grace.total_seconds())
        report.blobs = self._unreferenced_blobs(cutoff, dry_run)
        report.strays = self._stray_objects(cutoff, dry_run)
        report.uploads = None if dry_run else self.store.clean_staging(cutoff)
        logger.info(
            "gc%s: %d unreferenced blobs, %d stray objects (%d bytes), %s upload leftovers",
            " (dry run)" if dry_run else "",
            len(report.blobs),
            len(report.strays),
            report.removed_bytes,
            "-" if report.uploads is None else report.uploads,
        )
        return report

    # ---- 1. recorded, unreferenced

    def _unreferenced_blobs(self, cutoff: datetime, dry_run: bool) -> list[Removed]:
        removed = []
        for digest, size in self._candidates(cutoff):
            if dry_run or self._remove_blob(digest, cutoff):
                removed.append(Removed(digest, size))
        return removed

    def _candidates(self, cutoff: datetime) -> Iterator[tuple[str, int]]:
        after = ""
        while True:
            with self.database.read_sessions() as session:
                page = GcRepository(session).unreferenced(cutoff, after=after, limit=BATCH)
            yield from page
            if len(page) < BATCH:
                return
            after = page[-1][0]

    def _remove_blob(self, digest: str, cutoff: datetime) -> bool:
        with self.database.write_sessions() as session:
            try:
                if not GcRepository(session).delete_unreferenced(digest, cutoff):
                    return False  # referenced or marked in use since it was listed
            except IntegrityError:
                return False  # a version referencing it committed meanwhile (the foreign key said no)
            self.store.delete(digest)
            session.commit()
        return True

    # ---- 2. stored, never recorded

    def _stray_objects(self, cutoff: datetime, dry_run: bool) -> list[Removed]:
        removed = []
        # An object of unknown age is kept: it may be a direct upload about to be completed.
        old = (obj for obj in self.store.iter_blobs() if obj.modified is not None and obj.modified < cutoff)
        while batch := list(islice(old, BATCH)):
            with self.database.read_sessions() as session:
                recorded = GcRepository(session).recorded([obj.digest for obj in batch])
            for obj in batch:
                if obj.digest not in recorded and (dry_run or self._remove_stray(obj)):
                    removed.append(Removed(obj.digest, obj.size))
        return removed

    def _remove_stray(self, obj: StoredBlob) -> bool:
        with self.database.write_sessions() as session:
            if not GcRepository(session).claim(obj.digest, obj.size):
                return False  # recorded meanwhile: an upload of the same bytes finished
            self.store.delete(obj.digest)
            session.rollback()  # the placeholder row was only a lock
        return True
