"""What linking learned, kept in our own state DB so a re-link reads only what is new: the content cache (image
facts keyed by path + size + mtime, parse outcomes keyed by the text's hash or the file's stat) and the last
link's state (its read position in the jobs table, every job's outcome, the files each one depends on)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pandas as pd
import sqlalchemy as sa

from mondrian_assets.core.state_db import link_cache_table, link_state_table


def file_key(kind: str, path: Path) -> str | None:
    """A key that changes whenever the file does; None when the file cannot be stat'ed."""
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{kind}:{path}:{st.st_size}:{st.st_mtime_ns}"


class LinkCache:
    """Preloaded whole (one query) when most of it will be asked for, otherwise read key by key; new entries are
    written back in one transaction."""

    def __init__(self, engine: sa.Engine | None, *, preload: bool = True):
        self._engine = engine
        self._preloaded = preload
        self._entries: dict[str, dict] = {}
        self._new: dict[str, dict] = {}
        self.hits = 0
        self.misses = 0
        if engine is not None and preload:
            with engine.connect() as conn:
                rows = conn.execute(sa.select(link_cache_table.c.key, link_cache_table.c.value)).all()
            self._entries = {k: json.loads(v) for k, v in rows}

    def get(self, key: str | None) -> dict | None:
        if key is None:
            return None
        value = self._entries.get(key)
        if value is None and self._engine is not None and not self._preloaded:
            with self._engine.connect() as conn:
                stored = conn.execute(sa.select(link_cache_table.c.value).where(link_cache_table.c.key == key)).scalar()
            if stored is not None:
                value = self._entries[key] = json.loads(stored)
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


_DELTA_MIN = 2000  # rows; the changes are folded into the base once they pass this or a fifth of the base


class LinkStore:
    """The content cache and the last link's state, in our own state DB. The state's big part, one row per job
    (a frame keyed by its first column), is kept as a base plus the changes since, so a link that changed ten
    rows writes those ten rows, not all of them."""

    def __init__(self, engine: sa.Engine):
        self._engine = engine
        self._base_rows = 0
        self._changes: tuple[set, pd.DataFrame] | None = None  # (rowids gone from the base, rows added) as loaded

    def cache(self, *, preload: bool) -> LinkCache:
        return LinkCache(self._engine, preload=preload)

    def _read(self, key: str) -> dict[str, bytes] | None:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(link_state_table.c.name, link_state_table.c.key, link_state_table.c.value)).all()
        parts = {name: value for name, stored_key, value in rows if stored_key == key}
        return parts if {"state", "base", "changes"} <= parts.keys() else None

    def load_state(self, key: str) -> tuple[object, pd.DataFrame] | None:
        """The state saved under `key` (its small part, and its rows), or None: none yet, saved for another app or
        linker version, or unreadable with this Python's libraries. Any None costs a full link, nothing more."""
        parts = self._read(key)
        if parts is None:
            return None
        try:
            persisted, base, (gone, added) = (pickle.loads(parts[name]) for name in ("state", "base", "changes"))
        except Exception:  # a library version that pickles differently
            return None
        self._base_rows, self._changes = len(base), (gone, added)
        rowid = base.columns[0]
        return persisted, pd.concat([base[~base[rowid].isin(gone)], added], ignore_index=True)

    def save_state(self, key: str, persisted: object, rows: pd.DataFrame, added: pd.DataFrame, *,
                   removed: set | None) -> None:  # fmt: skip
        """Save the small part whole, and the rows as a change to the base: `removed` rowids went, `added` came.
        removed=None (a full link): `rows` become the base."""
        rowid = rows.columns[0]
        parts = {"state": pickle.dumps(persisted, protocol=5)}
        if removed is None or self._changes is None:
            changes = None
        else:
            gone, earlier = self._changes
            earlier = earlier[~earlier[rowid].isin(removed)]
            changes = (gone | removed, pd.concat([earlier, added], ignore_index=True) if len(added) else earlier)
            if len(changes[0]) + len(changes[1]) > max(_DELTA_MIN, self._base_rows // 5):
                changes = None
        if changes is None:
            parts["base"] = pickle.dumps(rows, protocol=5)
            changes = (set(), rows.iloc[:0])
            self._base_rows = len(rows)
        parts["changes"] = pickle.dumps(changes, protocol=5)
        self._changes = changes
        values = [{"name": name, "key": key, "value": value} for name, value in parts.items()]
        with self._engine.begin() as conn:
            conn.execute(sa.insert(link_state_table).prefix_with("OR REPLACE"), values)
