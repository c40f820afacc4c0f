"""Retention: what the node holds of a finished study goes after configured ages.

The node is not an archive: the PACS keeps the images and the results it was sent,
and can send a study again. Received images, result objects and database rows of a
study are needed while it is in work and for a while after (to look into a result, to
analyse a late image with the rest); after that they are patient data piling up.

Which studies: done, skipped and failed ones with no delivery pending, the states
nothing moves on from without a new image or `fractured retry`. Failed studies are
included because the node's copy is of no more use there than for a done one, and
leaving them out would let exactly the studies nobody looks at pile up; but a result
object that a destination never took (a dead letter, listed by `fractured status`)
stays until the study's records go, so `fractured retry` can still send it. Ages count
from when the study settled: its last image, run or delivery attempt, whichever is
latest ([retention] in config.toml).

Each study is purged in one transaction of the queue's (Queue.forget): under the
study's lock, and only if nothing changed since the plan, its files go and then its
rows. An image file rewritten after its row in the last minutes (a copy sent again
under [node].duplicates = "replace", its row waiting on the lock) also leaves the study
alone this run. The study folder is fsynced before the commit, so that a crash leaves
rows without files, which the next run removes, never files without rows, which
daemon.recovery would record as a new study. Retention reads and changes the tables
only through the queue.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fractured import log
from fractured.config import RetentionSettings, Settings
from fractured.daemon.queue import Queue, SettledStudy
from fractured.durable import fsync_path

#: A spool image rewritten this recently, and after its row, is a copy being recorded now.
RECENT_WRITE_S = 300.0
#: Slack between a file's modification time and the row written just after it.
CLOCK_SLACK_S = 1.0

_log = log.get("fractured.retention")


@dataclass(frozen=True)
class SpoolImage:
    """A received image's file, and when its row was written (see RECENT_WRITE_S)."""

    path: Path
    received_at: datetime


@dataclass(frozen=True)
class StudyPurge:
    """What goes of one study, and why."""

    study: SettledStudy  # as the plan read it
    #: why each kind goes ("images", "results", "records": all of it), e.g.
    #: {"images": "done 8.0 days ago, images_days 7"}
    reasons: dict[str, str]
    images: tuple[SpoolImage, ...]  # files to remove (their rows go with them)
    results: Path | None  # the study's results folder, to remove
    files: int
    bytes: int
    rows: int

    @property
    def study_instance_uid(self) -> str:
        return self.study.study_instance_uid

    @property
    def records(self) -> bool:
        """Whether the study's rows go too."""
        return "records" in self.reasons


@dataclass(frozen=True)
class PurgePlan:
    """Everything a purge at `now` would remove, study by study."""

    now: datetime
    studies: tuple[StudyPurge, ...]

    @property
    def files(self) -> int:
        return sum(s.files for s in self.studies)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.studies)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.studies)


@dataclass(frozen=True)
class PurgeResult:
    """What a purge removed; `changed`: studies left alone because they moved on since
    the plan; `failed`: studies whose files could not be removed (rows kept)."""

    studies: int
    files: int
    bytes: int
    rows: int
    changed: int
    failed: int


def plan(queue: Queue, settings: Settings, now: datetime) -> PurgePlan:
    """What a purge at `now` (naive UTC, as the database stores time) would remove."""
    keep = settings.retention
    ages = [days for days in (keep.images_days, keep.results_days, keep.records_days) if days]
    if not ages:
        return PurgePlan(now, ())
    studies = (_plan_study(queue, keep, settings.node.spool_dir, now, study)
               for study in queue.settled(now - timedelta(days=min(ages))))
    return PurgePlan(now, tuple(purge for purge in studies if purge is not None))


def apply(queue: Queue, plan: PurgePlan) -> PurgeResult:
    """Remove what `plan` lists, study by study (see the module docstring); logs
    retention.purged."""
    started = time.monotonic()
    done = changed = failed = files = size = rows = 0
    for study in plan.studies:
        ctx = {"study_instance_uid": study.study_instance_uid}
        try:
            outcome = _purge(queue, plan.now, study)
        except OSError as exc:  # its rows stay; the next run tries again
            _log.warning("retention.study_failed", error=str(exc), **ctx)
            failed += 1
            continue
        if outcome is None:
            _log.debug("retention.study_changed", **ctx)
            changed += 1
            continue
        done += 1
        files, size, rows = files + outcome[0], size + outcome[1], rows + outcome[2]
        _log.debug("retention.study_purged", files=outcome[0], bytes=outcome[1],
                   rows=outcome[2], kinds=sorted(study.reasons), **ctx)
    result = PurgeResult(done, files, size, rows, changed, failed)
    _log.info("retention.purged", studies=done, files=files, bytes=size, rows=rows,
              changed=changed, failed=failed, seconds=round(time.monotonic() - started, 3))
    return result


def _plan_study(queue: Queue, keep: RetentionSettings, spool: Path, now: datetime,
                study: SettledStudy) -> StudyPurge | None:
    """What goes of one settled study at `now`, or None when nothing does."""
    age_days = (now - study.settled_at) / timedelta(days=1)
    results_dir = spool / "results" / study.study_instance_uid

    def due(kind: str, days: float, applies: bool = True) -> dict[str, str]:
        if not applies or not days or age_days < days:
            return {}
        return {kind: f"{study.state} {age_days:.1f} days ago, {kind}_days {days:g}"}

    reasons = due("records", keep.records_days) or {
        **due("images", keep.images_days, study.images > 0),
        **due("results", keep.results_days,
              not study.dead_letters and results_dir.is_dir())}
    if not reasons:
        return None
    records = "records" in reasons
    images = (_spool_images(queue, spool, study)
              if records or "images" in reasons else ())
    results = results_dir if (records and results_dir.is_dir()) or "results" in reasons \
        else None
    paths = [image.path for image in images]
    if results is not None:
        paths += [p for p in results.rglob("*") if not p.is_dir()]
    sizes = [size for size in map(_size, paths) if size is not None]
    rows = (queue.record_count(study) if records
            else study.images if "images" in reasons else 0)
    return StudyPurge(study, reasons, images, results, len(sizes), sum(sizes), rows)


def _spool_images(queue: Queue, spool: Path, study: SettledStudy
                  ) -> tuple[SpoolImage, ...]:
    """The study's image files inside the spool; a row naming a file elsewhere loses
    its row, never the file (retention removes only what the node wrote)."""
    incoming = (spool / "incoming").resolve()
    images, outside = [], 0
    for path, received_at in queue.study_files(study.id):
        if path.resolve().is_relative_to(incoming):
            images.append(SpoolImage(path, received_at))
        else:
            outside += 1
    if outside:
        _log.warning("retention.outside_spool", study_instance_uid=study.study_instance_uid,
                     images=outside,
                     detail="rows naming files outside the spool: the files are kept")
    return tuple(images)


def _size(path: Path) -> int | None:
    """A file's size, or None when it is gone (a purge a crash cut short)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _purge(queue: Queue, now: datetime, purge: StudyPurge) -> tuple[int, int, int] | None:
    """Purge one study under its lock: (files, bytes, rows), or None when it changed."""

    def remove() -> tuple[int, int] | None:
        if any(_rewritten(image, now) for image in purge.images):
            return None
        files, size = _remove_images(purge.images)
        if purge.results is not None:
            more_files, more_size = _remove_tree(purge.results)
            files, size = files + more_files, size + more_size
        return files, size

    forgotten = queue.forget(purge.study, now, remove, records=purge.records,
                             images="images" in purge.reasons)
    if forgotten is None:
        return None
    (files, size), rows = forgotten
    return files, size, rows


def _rewritten(image: SpoolImage, now: datetime) -> bool:
    """Whether the image's file was written again after its row, in the last minutes."""
    try:
        modified = image.path.stat().st_mtime
    except FileNotFoundError:
        return False
    row = image.received_at.replace(tzinfo=UTC).timestamp()
    recent = now.replace(tzinfo=UTC).timestamp() - RECENT_WRITE_S
    return modified > row + CLOCK_SLACK_S and modified > recent


def _remove_images(images: tuple[SpoolImage, ...]) -> tuple[int, int]:
    """Remove image files, then their study folders if empty, and fsync the folders
    that held them, so the removals are on disk before the rows go: (files, bytes)."""
    files = size = 0
    for image in images:
        found = _size(image.path)
        image.path.unlink(missing_ok=True)
        if found is not None:
            files, size = files + 1, size + found
    for folder in {image.path.parent for image in images}:
        with suppress(OSError):  # not empty: a late image (or one left for an admin)
            folder.rmdir()
        with suppress(FileNotFoundError):  # a folder a crash or another purge took
            fsync_path(folder if folder.is_dir() else folder.parent)
    return files, size


def _remove_tree(folder: Path) -> tuple[int, int]:
    """Remove a study's results folder, if another purge has not: (files, bytes)."""
    sizes = [size for path in folder.rglob("*")
             if not path.is_dir() and (size := _size(path)) is not None]
    with suppress(FileNotFoundError):
        shutil.rmtree(folder)
    return len(sizes), sum(sizes)


def report(plan: PurgePlan, result: PurgeResult | None) -> dict[str, object]:
    """The plan (and what was removed, after apply) as JSON-ready data: UIDs, states,
    counts and reasons only, no patient data."""
    return {
        "now": plan.now.isoformat(),
        "plan": {"studies": len(plan.studies), "files": plan.files, "bytes": plan.bytes,
                 "rows": plan.rows},
        "studies": [{"study_instance_uid": s.study_instance_uid,
                     "state": str(s.study.state),
                     "settled_at": s.study.settled_at.isoformat(),
                     "reasons": s.reasons, "files": s.files, "bytes": s.bytes,
                     "rows": s.rows} for s in plan.studies],
        "removed": None if result is None else dataclasses.asdict(result),
    }
