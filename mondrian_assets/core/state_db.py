"""Our own state DB (never the app's): its tables and the engine that creates them on first use."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

_metadata = sa.MetaData()
link_cache_table = sa.Table(
    "link_cache",
    _metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


def state_engine(state_db: Path) -> sa.Engine:
    """Our own SQLite file (never the app's): created on first use."""
    state_db.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(f"sqlite:///{state_db.as_posix()}", connect_args={"timeout": 30})
    _metadata.create_all(engine)
    return engine
