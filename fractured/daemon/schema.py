"""The node's tables: what a study's path through the node leaves in the database.

Times are naive UTC (`utcnow`): SQLite keeps no time zone. States are the enums of
daemon.states, stored by name. The tables are made and kept up to date by the
revisions of daemon.migrations (a test holds them equal to these classes); the
transitions that change them are daemon.queue's, the listener's records
daemon.intake's.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, Enum, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fractured.daemon.states import DeliveryState, StudyState


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zone, so every stored time is UTC by convention."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[StudyState] = mapped_column(
        Enum(StudyState, native_enum=False, length=16), index=True)
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime)
    runs: Mapped[int] = mapped_column(Integer, default=0)
    processed_at: Mapped[datetime | None] = mapped_column(DateTime)
    reason: Mapped[str | None] = mapped_column(Text)
    #: images recorded for the study, a copy sent again included: a run whose claim saw
    #: fewer was overtaken by a late image (clocks, the listener's or other nodes', can
    #: disagree; this count cannot)
    received: Mapped[int] = mapped_column(Integer, server_default="0")
    #: claims whose run has not ended (finished or failed): its worker died on it
    unfinished_claims: Mapped[int] = mapped_column(Integer, server_default="0")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime)


class Delivery(Base):
    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    run: Mapped[int] = mapped_column(Integer)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    state: Mapped[DeliveryState] = mapped_column(
        Enum(DeliveryState, native_enum=False, length=16), index=True)
    #: the node sending it (Queue.take_due_deliveries) until its attempt is recorded
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    done_at: Mapped[datetime | None] = mapped_column(DateTime)


class ShadowFinding(Base):
    """One image of one study run, as the active and the shadow model saw it (daemon.shadow)."""

    __tablename__ = "shadow_findings"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    run: Mapped[int] = mapped_column(Integer)
    recorded_at: Mapped[datetime] = mapped_column(DateTime)
    active_model: Mapped[str] = mapped_column(String(128))
    active_probability: Mapped[float] = mapped_column(Float)
    active_level: Mapped[str] = mapped_column(String(16))
    active_boxes: Mapped[int] = mapped_column(Integer)
    shadow_model: Mapped[str] = mapped_column(String(128))
    shadow_probability: Mapped[float] = mapped_column(Float)
    shadow_level: Mapped[str] = mapped_column(String(16))
    shadow_boxes: Mapped[int] = mapped_column(Integer)


class ImageOutcome(Base):
    """What one run concluded about one routed image: its body region ("other" where
    none), its decision level and probability, or, for an image outside the model's
    intended use, no level and why (`scope`). Written with the run's results, in the
    same transaction; read by `fractured status` for the last 7 days against the
    model's expected flag rates. UIDs, a region and numbers: no patient data."""

    __tablename__ = "image_outcomes"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    run: Mapped[int] = mapped_column(Integer)
    recorded_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    model: Mapped[str] = mapped_column(String(128))
    region: Mapped[str] = mapped_column(String(16))
    scope: Mapped[str] = mapped_column(String(32))  # engine.intended_use.ScopeReason
    level: Mapped[str | None] = mapped_column(String(16))  # None: not analysed
    probability: Mapped[float | None] = mapped_column(Float)
