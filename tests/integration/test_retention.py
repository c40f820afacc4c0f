"""Retention (daemon.retention): what finished studies leave behind goes after its age,
and nothing of a study in work, nor an image that arrives during the purge.

Studies are made with the queue's own methods on a real database (SQLite, and a
PostgreSQL cluster of the tests' own where the server is installed) and real spool
files, then aged: every time the database holds of the study, and its files' times,
moved back by the same number of days (as if it had all happened then). The clock the
purge runs at is fixed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from fractured import config
from fractured.cli import main
from fractured.daemon import reports, retention
from fractured.daemon.connection import make_engine
from fractured.daemon.intake import ReceivedInstance
from fractured.daemon.queue import Queue, ResultObject
from fractured.daemon.recovery import check_spool
from fractured.daemon.schema import Delivery, ImageOutcome, Instance, ShadowFinding, Study, utcnow
from fractured.daemon.spool import incoming_path
from fractured.daemon.states import StudyState
from fractured.durable import write_durably
from tests import factory
from tests.paths import REPO
from tests.peers import NodeProcess, Storescp, storescu, wait_for

WORKER = "test-worker"
#: The ages these tests configure: images 7 days, results 14, records 30.
RETENTION = "[retention]\nimages_days = 7\nresults_days = 14\nrecords_days = 30\n"


@dataclass
class NodeState:
    """A node's database and spool, without its processes: what retention works on."""

    folder: Path
    settings: config.Settings
    queue: Queue

    @property
    def spool(self) -> Path:
        return self.settings.node.spool_dir


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return "sqlite:///q.db"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def node_state(tmp_path: Path, database_url: str) -> NodeState:
    path = tmp_path / "config.toml"
    path.write_text(f'[node]\nspool_dir = "spool"\n[database]\nurl = "{database_url}"\n'
                    f'[log]\nformat = "json"\n{RETENTION}')
    settings = config.load(path)
    queue = Queue(make_engine(settings.database.url))
    yield NodeState(tmp_path, settings, queue)
    queue.close()


def receive(node_state: NodeState, images: int = 2, study_uid: str | None = None) -> str:
    """Spool and record `images` new images of a study, as the listener does."""
    for ds in factory.dx_study(images):
        if study_uid is not None:
            ds.StudyInstanceUID = study_uid
        study_uid = str(ds.StudyInstanceUID)
        path = incoming_path(node_state.spool, study_uid, str(ds.SOPInstanceUID))
        ds.save_as(path.parent.mkdir(parents=True, exist_ok=True) or path,
                   enforce_file_format=True)
        node_state.queue.intake.record_instance(ReceivedInstance(
            study_instance_uid=study_uid, series_instance_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            modality="DX", path=path, size=path.stat().st_size, calling_ae="MODALITY"))
    assert study_uid is not None
    return study_uid


def process(node_state: NodeState, *, results: int = 2, destinations: tuple[str, ...] = ("pacs",),
            skipped: str | None = None) -> tuple[str, list[int]]:
    """Claim the ready study and finish it with result files: (UID, delivery ids)."""
    node_state.queue.mark_ready(0)
    claim = node_state.queue.claim(WORKER, 600)
    assert claim is not None
    objects = []
    for _ in range(results):
        path = node_state.spool / "results" / claim.study_instance_uid / str(claim.run) / "x.dcm"
        factory.basic_text_sr(path.parent.mkdir(parents=True, exist_ok=True) or path)
        uid = str(pydicom.dcmread(path).SOPInstanceUID)
        path = path.rename(path.with_name(f"{uid}.dcm"))
        objects.append(ResultObject(uid, factory.BASIC_TEXT_SR, path))
    before = {d.id for d in node_state.queue.due_deliveries()}
    outcome = ImageOutcome(  # what `fractured status` reads of the run's image
        study_instance_uid=claim.study_instance_uid, sop_instance_uid="1.2.3.4",
        run=claim.run, recorded_at=utcnow(), model="m-1", region="leg", scope="in_scope",
        level="possible", probability=0.4)
    node_state.queue.finish(claim, WORKER, objects, list(destinations), skipped=skipped,
                      outcomes=[outcome])
    if objects and destinations:
        write_durably(objects[0].path.parent / "committed", b"")
    return claim.study_instance_uid, [d.id for d in node_state.queue.due_deliveries()
                                      if d.id not in before]


def deliver(node_state: NodeState, deliveries: list[int], *, error: str | None = None) -> None:
    for delivery in node_state.queue.take_due_deliveries(WORKER, 60):
        if delivery.id in deliveries:
            node_state.queue.record_attempt(delivery, status=None if error else 0,
                                            error=error, retry_in_s=0, max_attempts=1)


def age(node_state: NodeState, study_uid: str, days: float) -> None:
    """Move everything the study's rows and files say about time `days` back."""
    moved = {"studies": ("first_received_at", "last_received_at", "claimed_at",
                         "lease_until", "processed_at"),
             "instances": ("received_at",), "deliveries": ("next_attempt_at", "done_at")}
    with Session(node_state.queue.engine) as session, session.begin():
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        assert study is not None
        owned = [study, *session.scalars(select(Instance).where(Instance.study_id == study.id)),
                 *session.scalars(select(Delivery).where(Delivery.study_id == study.id))]
        for row in owned:
            for column in moved[row.__tablename__]:
                if getattr(row, column) is not None:
                    setattr(row, column, getattr(row, column) - timedelta(days=days))
    spool = node_state.spool
    for folder in (spool / "incoming" / study_uid, spool / "results" / study_uid):
        for path in folder.rglob("*") if folder.exists() else ():
            stat = path.stat()
            os.utime(path, (stat.st_atime - days * 86400, stat.st_mtime - days * 86400))


def spool_files(node_state: NodeState) -> set[str]:
    spool = node_state.spool
    return {str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file()}


def rows(node_state: NodeState) -> dict[str, set[tuple[object, ...]]]:
    with node_state.queue.engine.connect() as db:
        return {table: {tuple(r) for r in db.execute(text(f"SELECT * FROM {table}"))}
                for table in ("studies", "instances", "deliveries", "shadow_findings",
                              "image_outcomes")}


def files_of(node_state: NodeState, study_uid: str) -> set[str]:
    return {f for f in spool_files(node_state) if f"/{study_uid}/" in f"/{f}"}


def state(node_state: NodeState, study_uid: str) -> str | None:
    return next((s["state"] for s in reports.studies(node_state.queue.engine)
                 if s["study_instance_uid"] == study_uid), None)


def shadow_row(study_uid: str) -> ShadowFinding:
    return ShadowFinding(
        study_instance_uid=study_uid, sop_instance_uid="1.2.3", run=1, recorded_at=utcnow(),
        active_model="a", active_probability=0.5, active_level="possible", active_boxes=0,
        shadow_model="b", shadow_probability=0.4, shadow_level="unlikely", shadow_boxes=0)


def done_study(node_state: NodeState, days: float, *, shadow: bool = False) -> str:
    receive(node_state)
    uid, deliveries = process(node_state)
    deliver(node_state, deliveries)
    if shadow:
        node_state.queue.record_shadow([shadow_row(uid)])
    age(node_state, uid, days)
    return uid


def clock() -> datetime:
    """The fixed 'now' of a purge: a moment after every study was made and aged."""
    return utcnow() + timedelta(seconds=1)


def test_each_kind_goes_at_its_age_and_studies_in_work_never(node_state: NodeState) -> None:
    fresh = done_study(node_state, 3)
    week_old = done_study(node_state, 10)  # images go (7), results stay (14)
    fortnight_old = done_study(node_state, 20)  # images and results go, rows stay (30)
    month_old = done_study(node_state, 40, shadow=True)  # everything goes
    receive(node_state)
    skipped, _ = process(node_state, results=0, skipped="no image to analyse")
    age(node_state, skipped, 10)
    receive(node_state)
    node_state.queue.mark_ready(0)
    failed_claim = node_state.queue.claim(WORKER, 600)
    assert failed_claim is not None
    node_state.queue.fail(failed_claim, WORKER, "processing error: test")
    failed = failed_claim.study_instance_uid
    age(node_state, failed, 40)
    receive(node_state)
    dead_letter, deliveries = process(node_state)
    deliver(node_state, deliveries, error="refused")  # max_attempts=1: dead letters at once
    age(node_state, dead_letter, 20)
    # In work, however old: still delivering; done but an earlier run's delivery still
    # retrying; being processed; ready; receiving.
    receive(node_state)
    delivering, _ = process(node_state)
    age(node_state, delivering, 40)
    pending_uid = receive(node_state)
    process(node_state)  # run 1: its deliveries pending
    receive(node_state, 1, study_uid=pending_uid)  # a late image: run 2 makes no results
    process(node_state, results=0, destinations=())
    age(node_state, pending_uid, 40)
    receive(node_state)
    node_state.queue.mark_ready(0)
    processing = node_state.queue.claim(WORKER, 600)
    assert processing is not None
    age(node_state, processing.study_instance_uid, 40)
    ready = receive(node_state)
    node_state.queue.mark_ready(0)
    age(node_state, ready, 40)
    receiving = receive(node_state)
    age(node_state, receiving, 40)
    assert [state(node_state, uid) for uid in (failed, dead_letter, delivering, pending_uid)] == [
        "failed", "failed", "delivering", "done"]

    before_files, before_rows = spool_files(node_state), rows(node_state)
    plan = retention.plan(node_state.queue, node_state.settings, clock())
    planned = {s.study_instance_uid: set(s.reasons) for s in plan.studies}
    assert planned == {week_old: {"images"}, fortnight_old: {"images", "results"},
                       month_old: {"records"}, skipped: {"images"}, failed: {"records"},
                       dead_letter: {"images"}}  # its undelivered results stay
    assert plan.studies[0].reasons["images"].startswith("done 10.0 days ago, images_days 7")
    assert (spool_files(node_state), rows(node_state)) == (before_files, before_rows)  # a plan only

    result = retention.apply(node_state.queue, plan)
    assert (result.studies, result.changed, result.failed) == (6, 0, 0)
    assert (result.files, result.bytes, result.rows) == (plan.files, plan.bytes, plan.rows)

    gone = before_files - spool_files(node_state)
    assert not spool_files(node_state) - before_files
    for uid in (week_old, skipped, dead_letter):  # images only
        assert {f for f in gone if uid in f} == {
            f for f in before_files if f.startswith(f"incoming/{uid}/")}
        assert not (node_state.spool / "incoming" / uid).exists()  # its empty folder too
    for uid in (fortnight_old, month_old, failed):  # images and results
        assert {f for f in gone if uid in f} == {f for f in before_files if uid in f}
        assert not (node_state.spool / "results" / uid).exists()
    assert len(gone) == result.files
    for uid in (fresh, delivering, pending_uid, processing.study_instance_uid, ready,
                receiving):
        assert not any(uid in f for f in gone)

    studies = {s["study_instance_uid"]: s for s in reports.studies(node_state.queue.engine)}
    assert month_old not in studies and failed not in studies
    assert {uid: studies[uid]["instances"] for uid in (week_old, fortnight_old, skipped,
                                                      dead_letter)} == dict.fromkeys(
        (week_old, fortnight_old, skipped, dead_letter), 0)
    assert studies[fortnight_old]["delivered"] == 2  # its delivery history stays
    # still listed, its files still there to retry
    assert reports.dead_letters(node_state.queue.engine)
    assert node_state.queue.shadow_findings() == []
    after = rows(node_state)
    # a study's outcome rows go with its records, and only then (of the two studies
    # whose records went, the failed one never finished a run, so it had none)
    assert len(before_rows["image_outcomes"]) - len(after["image_outcomes"]) == 1
    assert after["studies"] <= before_rows["studies"]
    assert len(before_rows["studies"]) - len(after["studies"]) == 2
    removed = sum(len(before_rows[t] - after[t]) for t in after)
    assert removed == result.rows

    again = retention.plan(node_state.queue, node_state.settings, clock())
    assert again.studies == ()  # nothing left to do until the ages are reached again


def test_a_late_image_recorded_after_the_plan_leaves_the_study_alone(node_state: NodeState) -> None:
    uid = done_study(node_state, 40)
    plan = retention.plan(node_state.queue, node_state.settings, clock())
    assert [s.study_instance_uid for s in plan.studies] == [uid]
    receive(node_state, 1, study_uid=uid)  # the listener records a late image meanwhile
    before = spool_files(node_state)

    result = retention.apply(node_state.queue, plan)
    assert (result.studies, result.changed, result.files, result.rows) == (0, 1, 0, 0)
    assert spool_files(node_state) == before
    assert state(node_state, uid) == "receiving"
    assert next(s for s in reports.studies(node_state.queue.engine))["instances"] == 3


def test_an_image_written_while_the_purge_runs_is_kept_and_makes_the_study_anew(
        node_state: NodeState) -> None:
    uid = done_study(node_state, 40)
    plan = retention.plan(node_state.queue, node_state.settings, clock())
    # The listener has written a late image's file; its row waits for the purge's lock.
    (late,) = factory.dx_study(1)
    late.StudyInstanceUID = uid
    path = incoming_path(node_state.spool, uid, str(late.SOPInstanceUID))
    late.save_as(path, enforce_file_format=True)

    result = retention.apply(node_state.queue, plan)
    assert (result.studies, result.changed) == (1, 0)
    assert spool_files(node_state) == {f"incoming/{uid}/{path.name}"}  # the folder stays for it
    assert reports.studies(node_state.queue.engine) == []
    node_state.queue.intake.record_instance(ReceivedInstance(
        study_instance_uid=uid, series_instance_uid=str(late.SeriesInstanceUID),
        sop_instance_uid=str(late.SOPInstanceUID), sop_class_uid=str(late.SOPClassUID),
        modality="DX", path=path, size=path.stat().st_size, calling_ae="MODALITY"))
    (study,) = reports.studies(node_state.queue.engine)
    assert (study["study_instance_uid"], study["state"], study["instances"]) == (
        uid, "receiving", 1)


def test_a_copy_written_again_after_its_row_leaves_the_study_alone(node_state: NodeState) -> None:
    uid = done_study(node_state, 10)
    plan = retention.plan(node_state.queue, node_state.settings, clock())
    (image, _) = plan.studies[0].images
    # duplicates = "replace": a corrected copy under the same UID; its row waits.
    image.path.write_bytes(image.path.read_bytes())
    result = retention.apply(node_state.queue, plan)
    assert (result.studies, result.changed) == (0, 1)
    assert image.path.exists() and state(node_state, uid) == "done"


def test_rows_a_crash_left_without_their_files_go_and_nothing_comes_back(
        node_state: NodeState) -> None:
    uid = done_study(node_state, 40)
    plan = retention.plan(node_state.queue, node_state.settings, clock())
    # What a crash after the files went and before the rows' commit leaves:
    for image in plan.studies[0].images:
        image.path.unlink()
    (node_state.spool / "incoming" / uid).rmdir()
    # the restart records nothing
    assert check_spool(node_state.spool, node_state.queue).recorded == 0

    queue = node_state.queue
    result = retention.apply(queue, retention.plan(queue, node_state.settings, clock()))
    assert (result.studies, result.files) == (1, 3)  # the results: 2 objects, "committed"
    assert reports.studies(node_state.queue.engine) == [] and spool_files(node_state) == set()


def test_a_row_naming_a_file_outside_the_spool_loses_its_row_not_the_file(
        node_state: NodeState) -> None:
    uid = done_study(node_state, 10)
    elsewhere = node_state.folder / "elsewhere.dcm"
    # e.g. a spool_dir changed under a database
    with Session(node_state.queue.engine) as session, session.begin():
        row = session.scalars(select(Instance).order_by(Instance.id)).first()
        assert row is not None
        Path(row.path).rename(elsewhere)
        row.path = str(elsewhere)
    kept = elsewhere.read_bytes()
    plan = retention.plan(node_state.queue, node_state.settings, clock())
    assert (plan.studies[0].files, plan.studies[0].rows) == (1, 2)
    retention.apply(node_state.queue, plan)
    assert elsewhere.read_bytes() == kept
    assert next(s for s in reports.studies(node_state.queue.engine))["instances"] == 0
    assert not (node_state.spool / "incoming" / uid).exists()


def test_ages_of_zero_keep_everything(node_state: NodeState) -> None:
    done_study(node_state, 4000)
    forever = config.from_dict({"retention": {"images_days": 0, "results_days": 0,
                                              "records_days": 0}}, base=node_state.folder)
    assert retention.plan(node_state.queue, forever, clock()).studies == ()


def test_purge_shows_what_would_go_and_dry_run_changes_nothing(node_state: NodeState) -> None:
    uid = done_study(node_state, 20)
    fresh = done_study(node_state, 1)
    before_files, before_rows = spool_files(node_state), rows(node_state)
    config_path = str(node_state.folder / "config.toml")

    dry = CliRunner().invoke(main, ["purge", "--config", config_path, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    # 2 images; 2 result objects and the run's "committed" marker; 2 instance rows
    assert "would remove: 1 studies, 5 files" in dry.output and "2 rows" in dry.output
    assert uid in dry.output and fresh not in dry.output
    assert "images: done 20.0 days ago, images_days 7" in dry.output
    dry_json = CliRunner().invoke(main, ["purge", "--config", config_path, "--dry-run",
                                         "--json"])
    report = json.loads(dry_json.stdout)
    assert report["dry_run"] is True and report["removed"] is None
    assert [s["study_instance_uid"] for s in report["studies"]] == [uid]
    assert (spool_files(node_state), rows(node_state)) == (before_files, before_rows)

    real = CliRunner().invoke(main, ["purge", "--config", config_path, "--json"])
    assert real.exit_code == 0, real.output
    done = json.loads(real.stdout)
    assert done["plan"] == report["plan"]
    assert done["removed"] == {"studies": 1, "files": 5, "bytes": report["plan"]["bytes"],
                               "rows": 2, "changed": 0, "failed": 0}
    (event,) = [json.loads(line) for line in real.stderr.splitlines()
                if '"retention.purged"' in line]
    assert (event["studies"], event["files"], event["bytes"]) == (1, 5,
                                                                  done["removed"]["bytes"])
    assert spool_files(node_state) == files_of(node_state, fresh)

    text = CliRunner().invoke(main, ["purge", "--config", config_path])
    assert text.exit_code == 0 and "removing: 0 studies" in text.output
    assert "removed: 0 studies, 0 files (0.0 MB), 0 rows" in text.output


def test_purge_refuses_a_bad_retention_config_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[retention]\nimages_days = 7\nrecords_days = 3\n")
    result = CliRunner().invoke(main, ["purge", "--config", str(path), "--dry-run"])
    assert result.exit_code == 1
    assert "configuration error" in result.output
    assert "[retention].records_days" in result.output and "images_days" in result.output
    assert not (tmp_path / "var").exists()  # refused before touching a database


@pytest.mark.parametrize(("table", "message"), [
    ({"images_days": -1}, r"\[retention\]\.images_days: days, or 0 to keep forever, got -1"),
    ({"interval_s": 0}, r"\[retention\]\.interval_s: must be greater than 0"),
    ({"records_days": 5}, r"\[retention\]\.records_days: .* at least images_days"),
    ({"results_days": 0}, r"\[retention\]\.records_days: .* results_days, which is then "
                          r"not 0"),
    ({"images_days": "7"}, r"\[retention\]\.images_days: expected a number"),
    ({"image_days": 7}, r"\[retention\]\.image_days: unknown key"),
])
def test_bad_retention_settings_name_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict({"retention": table}, base=REPO)


def test_the_shipped_config_writes_out_the_retention_defaults() -> None:
    shipped = config.load(REPO / "config.toml")
    assert shipped.retention == config.RetentionSettings()


@pytest.mark.slow
@pytest.mark.peers
def test_the_node_purges_a_delivered_study_on_schedule(tmp_path: Path,
                                                      untrained_bundle: Path) -> None:
    pacs = Storescp(tmp_path / "pacs").start()
    files = factory.write_study(tmp_path / "study", 2)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    # 0.00003 days: 2.6 s after it settled; the rows stay a day.
    node = NodeProcess(tmp_path / "node", untrained_bundle,
                       [{"name": "pacs", "ae_title": pacs.ae_title, "port": pacs.port}],
                       sections="[retention]\nimages_days = 0.00003\nresults_days = 0.00003"
                                "\nrecords_days = 1\ninterval_s = 1\n").start()
    try:
        assert storescu(node.port, files).returncode == 0
        wait_for("the results at the PACS", lambda: len(pacs.files()) == 3, 180)
        purged = wait_for("a purge of the study", lambda: [
            e for e in node.events("retention.purged") if e["files"] > 0], 120)
        # 2 images; the SR, 2 overlays and the run's "committed" marker
        assert (purged[0]["studies"], purged[0]["files"]) == (1, 6)
        spool = node.folder / "spool"
        assert not (spool / "incoming" / study_uid).exists()
        assert not (spool / "results" / study_uid).exists()
        (study,) = node.status()["study_list"]
        assert (study["study_instance_uid"], study["state"], study["instances"],
                study["delivered"]) == (study_uid, StudyState.DONE, 0, 3)
    finally:
        node.stop()
        pacs.stop()
    assert len(pacs.files()) == 3  # what was sent stays where it was sent
