"""Resources: the app's SQLite database (read-only) beside our own state DB, the MLX trainer, the alert webhook,
and when to retrain."""


import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
from pydantic import Field

from mondrian_assets.core.alerts import AlertNotSent, post_alert
from mondrian_assets.core.base_model import ResolvedBase, resolve_base
from mondrian_assets.core.data.app_db import read_only_engine
from mondrian_assets.core.data.new_examples import RetrainPolicy
from mondrian_assets.core.locations import Locations
from mondrian_assets.core.state_db import state_engine
from mondrian_assets.core.training.config import TrainConfig
from mondrian_assets.defs.config_fields import config_class, values_for


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


_TrainerFields = config_class("_TrainerFields", dg.ConfigurableResource, TrainConfig, exclude=("base_model",))
_POLICY_DEFAULTS = RetrainPolicy()


class MlxTrainer(_TrainerFields):
    """LoRA fine-tuning with MLX through mlx-vlm: every `TrainConfig` knob, with its default, description and
    bounds. Training runs in a child process, so an MLX crash fails the step (and its retry resumes from the last
    checkpoint) instead of taking the Dagster process down.

    `base_model` empty means the embedded tiny Qwen3-VL (built under <home>/models/base on first use); otherwise a
    local folder (an MLX 4-bit / 8-bit base too) or a hub id such as `Qwen/Qwen3-VL-4B-Instruct` already in the
    local Hugging Face cache. The other defaults suit the embedded model; for a 4B model lower `learning_rate`
    (e.g. 1e-4) and raise `max_seq_length`.
    """

    base_model: str | None = Field(default=None, description=(
        "A local model folder or a hub id in the local Hugging Face cache; empty: the embedded tiny model."))  # fmt: skip

    def resolved_base(self, models_dir: Path) -> ResolvedBase:
        """The base model's local folder, resolved once per step; raises BaseModelError saying what to do."""
        if self.base_model:
            return resolve_base(self.base_model)
        # imported here: only the embedded default needs the demo generator
        from mondrian_assets.demo.base_model import ensure_embedded_base_model

        return resolve_base(ensure_embedded_base_model(models_dir))

    def train_config(self, base: ResolvedBase) -> TrainConfig:
        return TrainConfig.from_dict(values_for(TrainConfig, self, base_model=str(base.path)))


class AlertWebhook(dg.ConfigurableResource):
    """Where alerts go: a webhook URL that receives a JSON POST (e.g. a Slack incoming webhook). Empty: no alert
    is sent. Default: $MONDRIAN_ALERT_WEBHOOK."""

    url: str | None = Field(default=None, description="Webhook URL; empty: $MONDRIAN_ALERT_WEBHOOK, or no alerts.")

    def resolved_url(self) -> str | None:
        return self.url or os.environ.get("MONDRIAN_ALERT_WEBHOOK") or None

    def send(self, payload: dict) -> str:
        """Post `payload`; say what happened (sent, not configured, or why it failed) instead of raising: a
        missed alert must not hide the failure it reports."""
        url = self.resolved_url()
        if url is None:
            return "no alert webhook configured (set MONDRIAN_ALERT_WEBHOOK or the alert_webhook resource)"
        try:
            return f"alert sent to {url} (HTTP {post_alert(url, payload)})"
        except AlertNotSent as exc:
            return str(exc)


class RetrainSettings(dg.ConfigurableResource):
    """When the retrain sensor asks for a run: once an advisor has `min_new_examples` new linkable examples, or
    `max_wait_hours` after the first of them, whichever comes first. Empty fields come from the environment
    (MONDRIAN_RETRAIN_MIN_NEW_EXAMPLES, MONDRIAN_RETRAIN_MAX_WAIT_HOURS), else the defaults (10, 24)."""

    min_new_examples: int | None = Field(default=None, description="New linkable examples that start a retrain.")
    max_wait_hours: float | None = Field(default=None, description="Start a retrain this long after the first new example, however few.")
    rows_per_tick: int = Field(default=_POLICY_DEFAULTS.rows_per_look, description="App rows read per tick at most (a first tick on a big app is spread over several).")
    waiting_checks_per_tick: int = Field(default=_POLICY_DEFAULTS.waiting_per_look, description="Finished-but-unlinkable jobs whose files are re-checked per tick, in turn.")

    def policy(self) -> RetrainPolicy:
        min_new = self.min_new_examples
        if min_new is None:
            min_new = int(os.environ.get("MONDRIAN_RETRAIN_MIN_NEW_EXAMPLES", _POLICY_DEFAULTS.min_new_examples))
        hours = self.max_wait_hours
        if hours is None:
            hours = float(os.environ.get("MONDRIAN_RETRAIN_MAX_WAIT_HOURS", _POLICY_DEFAULTS.max_wait_s / 3600))
        return RetrainPolicy(min_new, hours * 3600, self.rows_per_tick, self.waiting_checks_per_tick)
