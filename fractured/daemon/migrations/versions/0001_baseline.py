"""The schema fractured 0.8.1 made with create_all: studies, their instances and
deliveries, shadow findings and image outcomes.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("first_received_at", sa.DateTime, nullable=False),
        sa.Column("last_received_at", sa.DateTime, nullable=False),
        sa.Column("claimed_by", sa.String(128)),
        sa.Column("claimed_at", sa.DateTime),
        sa.Column("lease_until", sa.DateTime),
        sa.Column("runs", sa.Integer, nullable=False),
        sa.Column("processed_at", sa.DateTime),
        sa.Column("reason", sa.Text))
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False,
                  index=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("received_at", sa.DateTime, nullable=False))
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False,
                  index=True),
        sa.Column("run", sa.Integer, nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.DateTime, nullable=False),
        sa.Column("last_status", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.Column("done_at", sa.DateTime))
    op.create_table(
        "shadow_findings",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, index=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("run", sa.Integer, nullable=False),
        sa.Column("recorded_at", sa.DateTime, nullable=False),
        sa.Column("active_model", sa.String(128), nullable=False),
        sa.Column("active_probability", sa.Float, nullable=False),
        sa.Column("active_level", sa.String(16), nullable=False),
        sa.Column("active_boxes", sa.Integer, nullable=False),
        sa.Column("shadow_model", sa.String(128), nullable=False),
        sa.Column("shadow_probability", sa.Float, nullable=False),
        sa.Column("shadow_level", sa.String(16), nullable=False),
        sa.Column("shadow_boxes", sa.Integer, nullable=False))
    op.create_table(
        "image_outcomes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, index=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("run", sa.Integer, nullable=False),
        sa.Column("recorded_at", sa.DateTime, nullable=False, index=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("region", sa.String(16), nullable=False),
        sa.Column("scope", sa.String(32), nullable=False),
        sa.Column("level", sa.String(16)),
        sa.Column("probability", sa.Float))
