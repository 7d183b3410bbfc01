"""silence scope: all-tenant silences (tenant NULL) and a feature pattern; the fires a silence
withheld are found by an index (an all-tenant silence shows each tenant its own count)

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Silences made before this revision keep their tenant and have no feature pattern (NULL:
    # every fire of their detector).
    with op.batch_alter_table("silences", schema=None) as batch_op:
        batch_op.alter_column("tenant", existing_type=sa.String(length=64), nullable=True)
        batch_op.add_column(sa.Column("features", sa.String(length=200), nullable=True))
    # Partial: only withheld fires have a silence_id, so the index stays small.
    op.create_index(
        "ix_verdicts_silence",
        "verdicts",
        ["silence_id"],
        postgresql_where=sa.text("silence_id IS NOT NULL"),
        sqlite_where=sa.text("silence_id IS NOT NULL"),
    )


def downgrade() -> None:
    # The old schema has no place for an all-tenant silence: those rows (tenant NULL) are
    # deleted, then the column is made NOT NULL again. Feature patterns are dropped, so a
    # silence that had one withholds every fire of its detector again until it ends.
    op.drop_index("ix_verdicts_silence", table_name="verdicts")
    op.execute(sa.text("DELETE FROM silences WHERE tenant IS NULL"))
    with op.batch_alter_table("silences", schema=None) as batch_op:
        batch_op.drop_column("features")
        batch_op.alter_column("tenant", existing_type=sa.String(length=64), nullable=False)
