"""Fixtures build real things: a demo app (SQLite DB, images, analysis files) and a Dagster instance."""

import os
import shutil
from pathlib import Path

import dagster as dg
import pytest

from mondrian_assets.core.locations import Locations
from mondrian_assets.defs.resources import MlxTrainer, MondrianDatabase
from mondrian_assets.demo.app import DemoSummary, generate_demo_app
from mondrian_assets.demo.base_model import ensure_embedded_base_model
from mondrian_assets.demo.qwen_vocab_base import ensure_qwen_vocab_base

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach a model hub


@pytest.fixture(scope="session")
def pristine_demo(tmp_path_factory) -> DemoSummary:
    """Generated once per session; tests that change the app copy it first (`demo_app`)."""
    return generate_demo_app(tmp_path_factory.mktemp("pristine") / "app", seed=7)


@pytest.fixture
def demo_app(pristine_demo, tmp_path) -> Path:
    app = tmp_path / "app"
    shutil.copytree(pristine_demo.app_dir, app)
    return app


@pytest.fixture
def locations(demo_app, tmp_path) -> Locations:
    return Locations.resolve(app_dir=str(demo_app), home=str(tmp_path / "home"), environ={})


@pytest.fixture
def mondrian_db(locations) -> MondrianDatabase:
    return MondrianDatabase(app_dir=str(locations.app_dir), home=str(locations.home))


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture(scope="session")
def embedded_base(tmp_path_factory) -> Path:
    """The real embedded tiny Qwen3-VL, built once per session."""
    return ensure_embedded_base_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def qwen_vocab_models(tmp_path_factory) -> Path:
    """A models folder holding the tiny stand-in with Qwen's real tokenizer (converted once per session)."""
    models = tmp_path_factory.mktemp("qwen-vocab-models")
    ensure_qwen_vocab_base(models, "tiny")
    return models


@pytest.fixture(scope="session")
def qwen_vocab_base(qwen_vocab_models) -> Path:
    return ensure_qwen_vocab_base(qwen_vocab_models, "tiny")


@pytest.fixture
def trainer(embedded_base) -> MlxTrainer:
    """Short real training runs: enough steps for the loss to fall, few enough for a test."""
    return MlxTrainer(base_model=str(embedded_base), iters=12, eval_interval=6, save_interval=6, warmup_steps=2)
