"""delivery event: a delivery row is an alert's trigger ('alert') or its resolution ('resolve')

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Deliveries stored before this revision are alerts (triggers).
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("event", sa.String(length=16), server_default="alert", nullable=False)
        )
        batch_op.drop_constraint("uq_delivery_alert_webhook", type_="unique")
        batch_op.create_unique_constraint(
            "uq_delivery_alert_webhook_event", ["alert_id", "webhook", "event"]
        )


def downgrade() -> None:
    op.execute("DELETE FROM webhook_deliveries WHERE event <> 'alert'")
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_constraint("uq_delivery_alert_webhook_event", type_="unique")
        batch_op.create_unique_constraint("uq_delivery_alert_webhook", ["alert_id", "webhook"])
        batch_op.drop_column("event")
