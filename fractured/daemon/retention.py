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

Each study is purged in one transaction, in this order:
- lock: an UPDATE of the study's row that changes nothing takes its row lock (on
  SQLite the database's write lock), so the listener's record of a late image for it
  waits until the purge commits, and then finds the study (re-opened) or none (made
  anew): the image is kept either way;
- compare-and-set: under the lock the study is read again, and anything that changed
  since the plan (its state, a new image, a run, a delivery retried) leaves it alone
  this run; so does an image file rewritten after its row in the last minutes (a copy
  sent again under [node].duplicates = "replace", its row waiting on the lock);
- files, then rows: the start-up check records any spool image without a row as a
  new received image (daemon.recovery), so a crash in between must leave rows without
  files, which the next run removes, never files without rows, which would come back
  as a study. The study folder is fsynced before the commit for the same reason.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Connection, case, delete, func, select, update

from fractured import log
from fractured.config import RetentionSettings, Settings
from fractured.daemon.queue import (
    Delivery,
    DeliveryState,
    ImageOutcome,
    Instance,
    Queue,
    ShadowFinding,
    Study,
    StudyState,
)
from fractured.daemon.states import SETTLED
from fractured.durable import fsync_path

#: The states a study rests in once its work is over (daemon.states: only a late image
#: or an operator moves it on).
FINISHED = SETTLED
#: A spool image rewritten this recently, and after its row, is a copy being recorded now.
RECENT_WRITE_S = 300.0
#: Slack between a file's modification time and the row written just after it.
CLOCK_SLACK_S = 1.0

_log = log.get("fractured.retention")


@dataclass(frozen=True)
class Finished:
    """What the plan knew of a finished study; read again under its lock and compared."""

    state: StudyState
    last_received_at: datetime
    runs: int
    settled_at: datetime
    images: int  # instance rows
    dead_letters: bool  # a delivery of its latest run gave up


@dataclass(frozen=True)
class SpoolImage:
    """A received image's file, and when its row was written (see RECENT_WRITE_S)."""

    path: Path
    received_at: datetime


@dataclass(frozen=True)
class StudyPurge:
    """What goes of one study, and why."""

    study_id: int
    study_instance_uid: str
    finished: Finished
    #: why each kind goes ("images", "results", "records": all of it), e.g.
    #: {"images": "done 8.0 days ago, images_days 7"}
    reasons: dict[str, str]
    images: tuple[SpoolImage, ...]  # files to remove (their rows go with them)
    results: Path | None  # the study's results folder, to remove
    files: int
    bytes: int
    rows: int

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
    studies = []
    with queue.engine.connect() as conn:
        for study_id, uid, finished in _finished(conn, now - timedelta(days=min(ages))):
            purge = _plan_study(conn, keep, settings.node.spool_dir, now, study_id, uid,
                                finished)
            if purge is not None:
                studies.append(purge)
    return PurgePlan(now, tuple(studies))


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


def _finished(conn: Connection, settled_before: datetime, study_id: int | None = None
              ) -> list[tuple[int, str, Finished]]:
    """Finished studies with no delivery pending whose last image came before
    `settled_before` (they cannot have settled later), or only study `study_id`."""
    deliveries = (
        select(Delivery.study_id,
               func.max(Delivery.done_at).label("done_at"),
               # a failed delivery's last attempt was made when it was due
               func.max(Delivery.next_attempt_at).label("attempted_at"),
               func.sum(case((Delivery.state == DeliveryState.PENDING, 1), else_=0))
               .label("pending"),
               func.sum(case(((Delivery.state == DeliveryState.FAILED)
                              & (Delivery.run == Study.runs), 1), else_=0))
               .label("dead_letters"))
        .join(Study, Study.id == Delivery.study_id).group_by(Delivery.study_id).subquery())
    images = (select(Instance.study_id, func.count().label("images"))
              .group_by(Instance.study_id).subquery())
    query = (select(Study.id, Study.study_instance_uid, Study.state, Study.last_received_at,
                    Study.runs, Study.processed_at, deliveries.c.done_at,
                    deliveries.c.attempted_at, deliveries.c.dead_letters, images.c.images)
             .outerjoin(deliveries, deliveries.c.study_id == Study.id)
             .outerjoin(images, images.c.study_id == Study.id)
             .where(Study.state.in_(FINISHED), Study.last_received_at <= settled_before,
                    func.coalesce(deliveries.c.pending, 0) == 0)
             .order_by(Study.id))
    if study_id is not None:
        query = query.where(Study.id == study_id)
    found = []
    for row in conn.execute(query):
        settled = max(t for t in (row.last_received_at, row.processed_at, row.done_at,
                                  row.attempted_at) if t is not None)
        found.append((row.id, row.study_instance_uid, Finished(
            StudyState(row.state), row.last_received_at, row.runs, settled,
            row.images or 0, bool(row.dead_letters))))
    return found


def _plan_study(conn: Connection, keep: RetentionSettings, spool: Path, now: datetime,
                study_id: int, uid: str, finished: Finished) -> StudyPurge | None:
    """What goes of one finished study at `now`, or None when nothing does."""
    age_days = (now - finished.settled_at) / timedelta(days=1)
    results_dir = spool / "results" / uid

    def due(kind: str, days: float, applies: bool = True) -> dict[str, str]:
        if not applies or not days or age_days < days:
            return {}
        return {kind: f"{finished.state} {age_days:.1f} days ago, {kind}_days {days:g}"}

    reasons = due("records", keep.records_days) or {
        **due("images", keep.images_days, finished.images > 0),
        **due("results", keep.results_days,
              not finished.dead_letters and results_dir.is_dir())}
    if not reasons:
        return None
    records = "records" in reasons
    images = (_spool_images(conn, spool, study_id, uid)
              if records or "images" in reasons else ())
    results = results_dir if (records and results_dir.is_dir()) or "results" in reasons \
        else None
    paths = [image.path for image in images]
    if results is not None:
        paths += [p for p in results.rglob("*") if not p.is_dir()]
    sizes = [size for size in map(_size, paths) if size is not None]
    rows = finished.images if records or "images" in reasons else 0
    if records:
        rows += 1 + sum(conn.execute(select(func.count()).where(where)).scalar_one()
                        for where in (Delivery.study_id == study_id,
                                      ShadowFinding.study_instance_uid == uid,
                                      ImageOutcome.study_instance_uid == uid))
    return StudyPurge(study_id, uid, finished, reasons, images, results, len(sizes),
                      sum(sizes), rows)


def _spool_images(conn: Connection, spool: Path, study_id: int, uid: str
                  ) -> tuple[SpoolImage, ...]:
    """The study's image files inside the spool; a row naming a file elsewhere loses
    its row, never the file (retention removes only what the node wrote)."""
    incoming = (spool / "incoming").resolve()
    images, outside = [], 0
    for path, received_at in conn.execute(select(Instance.path, Instance.received_at)
                                          .where(Instance.study_id == study_id)):
        if Path(path).resolve().is_relative_to(incoming):
            images.append(SpoolImage(Path(path), received_at))
        else:
            outside += 1
    if outside:
        _log.warning("retention.outside_spool", study_instance_uid=uid, images=outside,
                     detail="rows naming files outside the spool: the files are kept")
    return tuple(images)


def _size(path: Path) -> int | None:
    """A file's size, or None when it is gone (a purge a crash cut short)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _purge(queue: Queue, now: datetime, study: StudyPurge) -> tuple[int, int, int] | None:
    """Purge one study under its lock: (files, bytes, rows), or None when it changed."""
    with queue.engine.begin() as conn:
        conn.execute(update(Study).where(Study.id == study.study_id)
                     .values(state=Study.state))  # the lock (see the module docstring)
        still = _finished(conn, now, study.study_id)
        if still != [(study.study_id, study.study_instance_uid, study.finished)] or any(
                _rewritten(image, now) for image in study.images):
            return None
        files, size = _remove_images(study.images)
        if study.results is not None:
            more_files, more_size = _remove_tree(study.results)
            files, size = files + more_files, size + more_size
        return files, size, _delete_rows(conn, study)


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


def _delete_rows(conn: Connection, study: StudyPurge) -> int:
    """The study's instance rows (its images went), or with its records all its rows,
    children first (foreign keys)."""
    if not study.records:
        if "images" not in study.reasons:
            return 0
        return conn.execute(delete(Instance).where(Instance.study_id == study.study_id)
                            ).rowcount
    return sum(conn.execute(statement).rowcount for statement in (
        delete(ShadowFinding).where(ShadowFinding.study_instance_uid == study.study_instance_uid),
        delete(ImageOutcome).where(ImageOutcome.study_instance_uid == study.study_instance_uid),
        delete(Delivery).where(Delivery.study_id == study.study_id),
        delete(Instance).where(Instance.study_id == study.study_id),
        delete(Study).where(Study.id == study.study_id)))


def report(plan: PurgePlan, result: PurgeResult | None) -> dict[str, object]:
    """The plan (and what was removed, after apply) as JSON-ready data: UIDs, states,
    counts and reasons only, no patient data."""
    return {
        "now": plan.now.isoformat(),
        "plan": {"studies": len(plan.studies), "files": plan.files, "bytes": plan.bytes,
                 "rows": plan.rows},
        "studies": [{"study_instance_uid": s.study_instance_uid,
                     "state": str(s.finished.state),
                     "settled_at": s.finished.settled_at.isoformat(),
                     "reasons": s.reasons, "files": s.files, "bytes": s.bytes,
                     "rows": s.rows} for s in plan.studies],
        "removed": None if result is None else dataclasses.asdict(result),
    }
