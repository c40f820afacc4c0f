"""Studies count the images recorded for them (a copy sent again counts too), so that
a run can tell whether an image came after its claim without comparing clocks.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.add_column("studies", sa.Column("received", sa.Integer, nullable=False,
                                       server_default="0"))
    # what a study held so far: one record per image it has
    op.execute("UPDATE studies SET received = (SELECT count(*) FROM instances "
               "WHERE instances.study_id = studies.id)")
