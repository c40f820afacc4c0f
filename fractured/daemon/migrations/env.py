"""Alembic's environment script, run by `command.upgrade` from `migrations.prepare`:
the revisions run on the connection `prepare` holds (the config's "connection"
attribute), inside its transaction, so that on PostgreSQL the schema changes commit
with the advisory lock's release and a failed revision leaves the database as it was."""

from alembic import context

context.configure(connection=context.config.attributes["connection"],
                  transactional_ddl=True)
context.run_migrations()
