"""What linking learned about each file and analysis text, kept in our own state DB so a re-link reads only
what is new: image facts keyed by path + size + mtime, parse outcomes keyed by the text's hash or the file's stat."""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa

from mondrian_assets.core.state_db import link_cache_table


def file_key(kind: str, path: Path) -> str | None:
    """A key that changes whenever the file does; None when the file cannot be stat'ed."""
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{kind}:{path}:{st.st_size}:{st.st_mtime_ns}"


class LinkCache:
    """Loaded whole at the start of a link (one query), new entries written back in one transaction."""

    def __init__(self, engine: sa.Engine | None):
        self._engine = engine
        self._entries: dict[str, dict] = {}
        self._new: dict[str, dict] = {}
        self.hits = 0
        self.misses = 0
        if engine is not None:
            with engine.connect() as conn:
                rows = conn.execute(sa.select(link_cache_table.c.key, link_cache_table.c.value)).all()
            self._entries = {k: json.loads(v) for k, v in rows}

    def get(self, key: str | None) -> dict | None:
        if key is None:
            return None
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str | None, value: dict) -> None:
        if key is not None:
            self._entries[key] = value
            self._new[key] = value

    def flush(self) -> None:
        if self._engine is None or not self._new:
            return
        rows = [{"key": k, "value": json.dumps(v)} for k, v in self._new.items()]
        with self._engine.begin() as conn:
            conn.execute(sa.insert(link_cache_table).prefix_with("OR REPLACE"), rows)
        self._new.clear()
