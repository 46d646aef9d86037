"""Resources: the app's SQLite database (read-only) beside our own state DB, both through SQLAlchemy."""


from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import sqlalchemy as sa
from pydantic import Field

from mondrian_assets.core.app_db import read_only_engine
from mondrian_assets.core.link_cache import state_engine
from mondrian_assets.core.locations import Locations


class MondrianDatabase(dg.ConfigurableResource):
    """The Mondrian app's `mondrian.db` (opened read-only, always) and our own state DB under MONDRIAN_HOME.

    Leave a location empty to take it from the environment: MONDRIAN_APP_DIR (the app's root), MONDRIAN_DB,
    MONDRIAN_SOURCE_DIR, MONDRIAN_ANALYSIS_DIR, MONDRIAN_HOME (everything we write; default: the working dir).
    """

    app_dir: str | None = Field(default=None, description="The app's root; default $MONDRIAN_APP_DIR or <home>/demo_app.")
    db_path: str | None = Field(default=None, description="The app's SQLite file; default $MONDRIAN_DB or <app_dir>/mondrian.db.")
    source_dir: str | None = Field(default=None, description="Bare image names live here; default <app_dir>/source.")
    analysis_dir: str | None = Field(default=None, description="Analysis files; default <app_dir>/analysis_md.")
    home: str | None = Field(default=None, description="Where we write; default $MONDRIAN_HOME or the working dir.")
    busy_timeout_s: float = Field(default=10.0, description="How long to wait for the app's write locks.")

    def locations(self) -> Locations:
        return Locations.resolve(
            app_dir=self.app_dir,
            db_path=self.db_path,
            source_dir=self.source_dir,
            analysis_dir=self.analysis_dir,
            home=self.home,
        )

    @contextmanager
    def app_connection(self) -> Iterator[sa.Connection]:
        engine = read_only_engine(self.locations().db_path, busy_timeout_s=self.busy_timeout_s)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            engine.dispose()

    def state_engine(self) -> sa.Engine:
        return state_engine(self.locations().state_db)
