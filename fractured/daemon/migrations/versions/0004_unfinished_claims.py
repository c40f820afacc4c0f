"""Studies count the claims whose run has not ended, so that a study its worker died
on (out of memory, a decoder crash) becomes FAILED after [worker].max_claims instead
of being claimed again and again.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.add_column("studies", sa.Column("unfinished_claims", sa.Integer, nullable=False,
                                       server_default="0"))
