"""Resources: the app's SQLite database (read-only) beside our own state DB, and the MLX trainer."""


from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
from pydantic import Field

from mondrian_assets.core.data.app_db import read_only_engine
from mondrian_assets.core.locations import Locations
from mondrian_assets.core.state_db import state_engine
from mondrian_assets.core.training.config import TrainConfig


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


_TRAIN_DEFAULTS = TrainConfig()


class MlxTrainer(dg.ConfigurableResource):
    """LoRA fine-tuning with MLX through mlx-vlm. Training runs in a child process, so an MLX crash fails the
    step (and its retry resumes from the last checkpoint) instead of taking the Dagster process down.

    `base_model` empty means the embedded tiny Qwen3-VL (built under <home>/models/base on first use);
    otherwise a local folder or a hub id such as `Qwen/Qwen3-VL-4B-Instruct`. The other defaults suit the
    embedded model; for a 4B model lower `learning_rate` (e.g. 1e-4) and raise `max_seq_length`.
    """

    base_model: str | None = Field(default=None, description="Local path or hub id; empty: the embedded tiny model.")
    dtype: str = Field(default=_TRAIN_DEFAULTS.dtype, description="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.")
    lora_rank: int = Field(default=_TRAIN_DEFAULTS.lora_rank)
    lora_alpha: float = Field(default=_TRAIN_DEFAULTS.lora_alpha)
    lora_dropout: float = Field(default=_TRAIN_DEFAULTS.lora_dropout)
    target_modules: list[str] = Field(default=list(_TRAIN_DEFAULTS.target_modules), description="Language-model projections that get LoRA.")
    train_vision: bool = Field(default=_TRAIN_DEFAULTS.train_vision, description="Also train the vision tower.")
    quantize_bits: int | None = Field(default=_TRAIN_DEFAULTS.quantize_bits, description="4 or 8: quantize the frozen base (QLoRA).")
    learning_rate: float = Field(default=_TRAIN_DEFAULTS.learning_rate)
    warmup_steps: int = Field(default=_TRAIN_DEFAULTS.warmup_steps)
    lr_schedule: str = Field(default=_TRAIN_DEFAULTS.lr_schedule, description="cosine or constant (after warm-up).")
    epochs: int = Field(default=_TRAIN_DEFAULTS.epochs)
    iters: int | None = Field(default=_TRAIN_DEFAULTS.iters, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(default=_TRAIN_DEFAULTS.batch_size)
    grad_accumulation: int = Field(default=_TRAIN_DEFAULTS.grad_accumulation)
    grad_checkpointing: bool = Field(default=_TRAIN_DEFAULTS.grad_checkpointing)
    max_seq_length: int = Field(default=_TRAIN_DEFAULTS.max_seq_length)
    answer_only_loss: bool = Field(default=_TRAIN_DEFAULTS.answer_only_loss, description="Loss on the answer tokens only.")
    seed: int = Field(default=_TRAIN_DEFAULTS.seed)
    eval_interval: int = Field(default=_TRAIN_DEFAULTS.eval_interval, description="Steps between validation-loss evaluations.")
    save_interval: int = Field(default=_TRAIN_DEFAULTS.save_interval, description="Steps between resumable checkpoints.")
    early_stopping_patience: int | None = Field(default=_TRAIN_DEFAULTS.early_stopping_patience, description="Evaluations without a new best before stopping; empty: never.")

    def resolved_base_model(self, models_dir: Path) -> str:
        if self.base_model:
            return self.base_model
        # imported here: only the embedded default needs the demo generator
        from mondrian_assets.demo.base_model import ensure_embedded_base_model

        return str(ensure_embedded_base_model(models_dir))

    def train_config(self, models_dir: Path) -> TrainConfig:
        values = {k: v for k, v in self.model_dump().items() if k in TrainConfig.__dataclass_fields__}
        return TrainConfig.from_dict(values | {"base_model": self.resolved_base_model(models_dir)})
