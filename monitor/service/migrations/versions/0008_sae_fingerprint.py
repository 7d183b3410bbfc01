"""turn SAE fingerprint: which dictionary a turn's stored features were read with

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Turns stored before this revision keep NULL: read with an SAE nobody recorded ("unknown");
    # `safety-monitor db reencode` sets it when it re-reads them (monitor.service.reencode).
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sae_fingerprint", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.drop_column("sae_fingerprint")
