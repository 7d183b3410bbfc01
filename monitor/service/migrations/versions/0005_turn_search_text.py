"""turns.search_text: the messages' content, lower-cased, for audit text search

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.add_column(sa.Column("search_text", sa.Text(), nullable=True))
    # Backfill the turns stored before this revision, a page at a time.
    conn = op.get_bind()
    turns = sa.table(
        "turns",
        sa.column("id", sa.String),
        sa.column("messages", sa.JSON),
        sa.column("search_text", sa.Text),
    )
    while True:
        rows = conn.execute(
            sa.select(turns.c.id, turns.c.messages).where(turns.c.search_text.is_(None)).limit(500)
        ).all()
        if not rows:
            break
        for turn_id, stored in rows:
            messages = json.loads(stored) if isinstance(stored, str) else stored
            text = "\n".join(str(m.get("content", "")) for m in messages or []).lower()
            conn.execute(sa.update(turns).where(turns.c.id == turn_id).values(search_text=text))


def downgrade() -> None:
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.drop_column("search_text")
