"""What `fractured status` shows of the queue: counts, recent outcomes, studies and dead
letters. Reads only, one short transaction each; UIDs, states and numbers, no patient
data."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from fractured.daemon.schema import Delivery, ImageOutcome, Instance, Study
from fractured.daemon.states import DeliveryState


def counts(engine: Engine) -> dict[str, dict[str, int]]:
    """Studies and deliveries by state, for `fractured status`."""
    with Session(engine) as s:
        studies = dict(s.execute(select(Study.state, func.count()).group_by(Study.state)
                                 ).all())
        deliveries = dict(s.execute(select(Delivery.state, func.count())
                                    .group_by(Delivery.state)).all())
    return {"studies": {str(k): v for k, v in studies.items()},
            "deliveries": {str(k): v for k, v in deliveries.items()}}


def outcomes_since(engine: Engine, since: datetime) -> dict[str, Any]:
    """Routed images recorded since `since`, for `fractured status`: analysed ones
    per region and level, the others per reason (each run of a study counts its
    images: a study analysed again after a late image counts twice)."""
    with Session(engine) as s:
        rows = s.execute(
            select(ImageOutcome.region, ImageOutcome.level, ImageOutcome.scope,
                   func.count())
            .where(ImageOutcome.recorded_at >= since)
            .group_by(ImageOutcome.region, ImageOutcome.level, ImageOutcome.scope)).all()
    regions: dict[str, dict[str, int]] = {}
    outside: dict[str, int] = {}
    for region, level, scope, count in rows:
        if level is None:
            outside[scope] = outside.get(scope, 0) + count
            continue
        entry = regions.setdefault(region, {"images": 0, "possible": 0, "likely": 0})
        entry["images"] += count
        if level in entry:
            entry[level] += count
    return {"since": since.isoformat(), "regions": regions, "not_analysed": outside}


def studies(engine: Engine, limit: int | None = None) -> list[dict[str, object]]:
    """One row per study (no patient data: UIDs and states only), oldest first; with
    `limit`, the `limit` studies recorded last. Two queries whatever the number."""
    with Session(engine) as s:
        query = (select(Study, func.count(Instance.id)).outerjoin(Instance)
                 .group_by(Study.id).order_by(Study.id.desc()))
        rows = list(reversed(s.execute(query if limit is None else query.limit(limit)).all()))
        done = (select(Delivery.study_id, func.count())
                .where(Delivery.state == DeliveryState.DONE).group_by(Delivery.study_id))
        if limit is not None:  # the listed studies' only (a bounded list of ids)
            done = done.where(Delivery.study_id.in_([study.id for study, _ in rows]))
        delivered = dict(s.execute(done).all())
        return [{"study_instance_uid": study.study_instance_uid,
                 "state": str(study.state), "instances": n, "runs": study.runs,
                 "delivered": delivered.get(study.id, 0), "reason": study.reason,
                 "last_received_at": study.last_received_at.isoformat()}
                for study, n in rows]


def dead_letters(engine: Engine) -> list[dict[str, object]]:
    """Deliveries of each study's latest run that gave up (UIDs, states, errors)."""
    with Session(engine) as s:
        rows = s.execute(
            select(Delivery, Study.study_instance_uid).join(Study)
            .where(Delivery.state == DeliveryState.FAILED, Delivery.run == Study.runs)
            .order_by(Delivery.id)).all()
        return [{"study_instance_uid": uid, "destination": d.destination,
                 "sop_instance_uid": d.sop_instance_uid, "sop_class_uid": d.sop_class_uid,
                 "attempts": d.attempts, "last_status": d.last_status,
                 "last_error": d.last_error} for d, uid in rows]
