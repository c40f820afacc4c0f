"""The queue database's schema through its revisions (daemon.migrations): an empty
database gets the tables the code declares, a database fractured 0.8.1 made is upgraded
with nothing lost, and one a newer fractured made is refused, naming both revisions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import Engine, inspect, text

from fractured.cli import main
from fractured.daemon import migrations, reports
from fractured.daemon.connection import make_engine
from fractured.daemon.intake import ReceivedInstance
from fractured.daemon.queue import Queue
from fractured.daemon.schema import Base
from tests.paths import REPO

#: the database fractured 0.8.1 made, with a study in each of three states
RELEASED = REPO / "tests" / "data" / "queue-0.8.1.sql"
TABLES = ("studies", "instances", "deliveries", "shadow_findings", "image_outcomes")


def released(path: Path) -> Engine:
    con = sqlite3.connect(path)
    con.executescript(RELEASED.read_text())
    con.close()
    return make_engine(f"sqlite:///{path}")


def columns(engine: Engine) -> dict[str, list[str]]:
    return {table: [c["name"] for c in inspect(engine).get_columns(table)] for table in TABLES}


def rows(engine: Engine, table: str, columns: list[str]) -> list[tuple[object, ...]]:
    """The table's rows, in the columns the released schema had."""
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(
            text(f"SELECT {', '.join(columns)} FROM {table} ORDER BY id"))]


def test_the_revisions_make_the_tables_the_code_declares(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    assert migrations.prepare(engine) == ["0001", "0002", "0003", "0004"]
    with engine.connect() as conn:
        assert migrations.current(conn) == migrations.head()
        assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                Base.metadata) == []
    assert migrations.prepare(engine) == []  # the next start finds nothing to do


def test_a_released_database_is_upgraded_with_nothing_lost(tmp_path: Path) -> None:
    engine = released(tmp_path / "q.db")
    kept = columns(engine)
    before = {table: rows(engine, table, kept[table]) for table in TABLES}
    assert all(before.values())  # every table holds something
    assert migrations.prepare(engine) == ["0002", "0003", "0004"]  # 0.8.1's tables are the baseline
    assert {table: rows(engine, table, kept[table]) for table in TABLES} == before
    with engine.connect() as conn:
        counted = conn.execute(text("SELECT study_instance_uid, received FROM studies"))
        assert dict(counted.all()) == {"1.2.3.1": 2, "1.2.3.2": 1, "1.2.3.3": 1}
    # and the node goes on with it: the receiving study completes, is claimed and run
    queue = Queue(engine)
    queue.intake.record_instance(ReceivedInstance(
        "1.2.3.3", "1.2.3.3.1", "1.2.3.3.2", "1.2.840.10008.5.1.4.1.1.1.1", "DX",
        Path("/spool/1.2.3.3.2.dcm"), 10, "MODALITY"))
    assert queue.mark_ready(0) == ["1.2.3.3"]
    claim = queue.claim("w1", 60)
    assert claim is not None and claim.received == 2 and len(claim.instances) == 2
    assert {s["study_instance_uid"]: s["state"] for s in reports.studies(engine)} == {
        "1.2.3.1": "done", "1.2.3.2": "failed", "1.2.3.3": "processing"}
    queue.close()


def test_a_database_of_a_newer_fractured_is_refused_naming_both(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    migrations.prepare(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(migrations.SchemaError, match=r"revision 0099.*knows up to 0004"):
        migrations.prepare(engine)
    config = tmp_path / "config.toml"
    config.write_text(f'[node]\nspool_dir = "spool"\n[database]\n'
                      f'url = "sqlite:///{tmp_path / "q.db"}"\n')
    result = CliRunner().invoke(main, ["status", "--config", str(config)])
    assert result.exit_code == 1
    assert "revision 0099" in result.output and "newer fractured" in result.output
