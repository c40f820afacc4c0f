"""Deliveries name the node sending them, so that an attempt is recorded only against
the claim that made it: a node whose hold ran out while a slow PACS answered cannot
turn another node's delivery into a dead letter.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("claimed_by", sa.String(128)))
