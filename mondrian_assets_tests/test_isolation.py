"""MLX tasks in child processes (core/isolation.py): what the caller sees when the child fails or dies.
Training's cases are in test_training.py; a killed evaluation retried by Dagster in test_model_assets.py."""

import pytest

from mondrian_assets.core.evaluation.run import EvalSettings, EvaluationFailed, evaluate_adapter
from mondrian_assets.core.inference.reload_check import generate_one, reload_and_generate
from mondrian_assets.core.isolation import crash_once_at


def test_a_killed_reload_check_is_a_failed_check_naming_the_signal(tmp_path, monkeypatch):
    for name, value in crash_once_at(generate_one, 0, tmp_path / "killed").items():
        monkeypatch.setenv(name, value)
    passed, detail = reload_and_generate("base", tmp_path / "adapter", tmp_path / "val.json", 8)
    assert (tmp_path / "killed").exists()
    assert passed is False and "the reload check process was killed by signal SIGKILL" in detail


def test_a_bad_evaluation_setting_is_raised_as_itself(tmp_path):
    with pytest.raises(ValueError, match="evaluation settings: .*batch_size"):
        evaluate_adapter("base", tmp_path, tmp_path / "val.json", tmp_path / "train.json", tmp_path / "out",
                         EvalSettings(batch_size=0))  # fmt: skip


def test_an_unexpected_evaluation_error_fails_with_the_childs_traceback(tmp_path):
    (tmp_path / "val.json").mkdir()  # not a file: the child cannot read it
    with pytest.raises(EvaluationFailed, match="evaluation failed: IsADirectoryError") as failure:
        evaluate_adapter("base", tmp_path, tmp_path / "val.json", tmp_path / "train.json", tmp_path / "out")
    assert failure.value.returncode == 1 and "Traceback" in failure.value.stderr_tail
