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
link_state_table = sa.Table(
    "link_state",
    _metadata,
    sa.Column("name", sa.Text, primary_key=True),  # state, base, changes
    sa.Column("key", sa.Text, nullable=False),  # which app, folders and linker version the state belongs to
    sa.Column("value", sa.LargeBinary, nullable=False),
)

# One row per /analyze request the service received, written before it answered (see core/serving/usage.py).
model_usage_table = sa.Table(
    "model_usage",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Text, nullable=False),  # UTC ISO time the answer was recorded
    sa.Column("job_id", sa.Text, index=True),  # the app's job id, or image-<content hash> when it sent none
    sa.Column("advisor", sa.Text),
    sa.Column("requested_mode", sa.Text),  # the request's `mode` as sent
    sa.Column("service_mode", sa.Text, nullable=False),
    sa.Column("route_mode", sa.Text),  # the mode that decided
    sa.Column("arm_draw", sa.Float),  # the job's A/B draw, when a split decided
    sa.Column("model_used", sa.Text),  # base | fine_tuned; NULL when nothing was generated
    sa.Column("version", sa.Integer),  # the fine-tuned version applied
    sa.Column("adapter_path", sa.Text),
    sa.Column("constrained", sa.Boolean),
    sa.Column("http_status", sa.Integer, nullable=False),
    sa.Column("latency_s", sa.Float, nullable=False),
    sa.Column("parse_ok", sa.Boolean),
    sa.Column("parse_error", sa.Text),
    sa.Column("grammar_corrections", sa.Integer),
    sa.Column("generation_tokens", sa.Integer),
    sa.Column("generation_tps", sa.Float),
    sa.Column("finish_reason", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("note", sa.Text),
)


# --- the model registry (core/registry/): the rows are the truth, files and the active pointer follow them ---
VERSION_STATUSES = ("candidate", "active", "retired", "rejected")
DEPLOYMENT_ACTIONS = ("promote", "reject", "rollback", "pin", "unpin")

model_versions_table = sa.Table(
    "model_versions",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("advisor", sa.Text, nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("content_hash", sa.Text, nullable=False),  # sha256 of what mlx_vlm.load reads: config + weights
    sa.Column("base_model", sa.Text, nullable=False),
    sa.Column("data_version", sa.Text, nullable=False),  # the training split's data version
    sa.Column("fingerprint", sa.Text, nullable=False),  # the training run's config + data fingerprint
    sa.Column("metrics", sa.Text, nullable=False),  # JSON: the fine-tuned metrics of the deciding evaluation
    sa.Column("eval_report", sa.Text),  # the report copied into the version dir
    sa.Column("gates_passed", sa.Boolean, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("pinned", sa.Boolean, nullable=False, default=False),
    sa.Column("path", sa.Text, nullable=False),  # models/versions/<advisor>-v<N>, relative to the state DB's folder
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("pruned_at", sa.Text),  # retention removed the files; the row stays as history
    sa.UniqueConstraint("advisor", "number"),
    sa.UniqueConstraint("advisor", "content_hash"),
    sa.CheckConstraint(f"status IN {VERSION_STATUSES}", name="known_status"),
)
# backstops for the decision logic: never two active or two pinned versions of one advisor
sa.Index("one_active_per_advisor", model_versions_table.c.advisor, unique=True,
         sqlite_where=model_versions_table.c.status == "active")  # fmt: skip
sa.Index("one_pin_per_advisor", model_versions_table.c.advisor, unique=True,
         sqlite_where=model_versions_table.c.pinned == sa.true())  # fmt: skip

deployments_table = sa.Table(
    "deployments",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("advisor", sa.Text, nullable=False),
    sa.Column("from_version", sa.Integer),  # the active version before (None: there was none)
    sa.Column("to_version", sa.Integer),  # the version acted on (a rejected candidate for `reject`)
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("reasons", sa.Text, nullable=False),  # JSON list of sentences
    sa.Column("evidence", sa.Text, nullable=False),  # JSON: report, gates, val data, candidate vs active
    sa.Column("evidence_key", sa.Text),  # one decision per (candidate, evidence): re-runs change nothing
    sa.Column("actor", sa.Text, nullable=False),  # a Dagster run id or `cli:<user>`
    sa.Column("at", sa.Text, nullable=False),
    sa.CheckConstraint(f"action IN {DEPLOYMENT_ACTIONS}", name="known_action"),
)
sa.Index("one_decision_per_evidence", deployments_table.c.advisor, deployments_table.c.to_version,
         deployments_table.c.evidence_key, unique=True,
         sqlite_where=deployments_table.c.evidence_key.is_not(None))  # fmt: skip

version_evaluations_table = sa.Table(
    "version_evaluations",
    _metadata,
    sa.Column("content_hash", sa.Text, primary_key=True),
    sa.Column("val_sha256", sa.Text, primary_key=True),  # the validation file's content
    sa.Column("settings_key", sa.Text, primary_key=True),  # base model, max tokens, batch, seed, examples
    sa.Column("results", sa.Text, nullable=False),  # JSON list of per-example outcomes
    sa.Column("created_at", sa.Text, nullable=False),
)


# --- the nightly re-check of each advisor's active version (core/registry/recheck.py): one row per re-check ---
evaluation_history_table = sa.Table(
    "evaluation_history",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("advisor", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("content_hash", sa.Text, nullable=False),
    sa.Column("evaluated_at", sa.Text, nullable=False),
    sa.Column("validation_data", sa.Text, nullable=False),
    sa.Column("val_sha256", sa.Text, nullable=False),  # which validation data it was judged on
    sa.Column("examples", sa.Integer, nullable=False),
    sa.Column("format_compliance", sa.Float),
    sa.Column("overall_score_mae", sa.Float),
    sa.Column("reference_format_compliance", sa.Float),  # the deployment-time evaluation's
    sa.Column("reference_overall_score_mae", sa.Float),
    sa.Column("min_format_compliance", sa.Float, nullable=False),
    sa.Column("mae_tolerance", sa.Float, nullable=False),
    sa.Column("passed", sa.Boolean, nullable=False),
    sa.Column("reasons", sa.Text, nullable=False),  # JSON list of sentences
    sa.Column("report", sa.Text, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),  # the Dagster run id, or `cli:<user>`
)

def state_engine(state_db: Path) -> sa.Engine:
    """Our own SQLite file (never the app's): created on first use."""
    state_db.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(f"sqlite:///{state_db.as_posix()}", connect_args={"timeout": 30})
    _metadata.create_all(engine)
    return engine
