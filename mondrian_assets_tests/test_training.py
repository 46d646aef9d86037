"""The LoRA trainer on a real (tiny, random) Qwen3-VL built in tmp_path: masking, validation, reload, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mondrian_assets.core import schema
from mondrian_assets.core.base_model import resolve_base
from mondrian_assets.core.training.config import (
    TrainConfig,
    TrainingConfigError,
    TrainingFailed,
    load_processor,
    validate_config,
)
from mondrian_assets.core.training.checkpoints import run_fingerprint
from mondrian_assets.core.training.examples import collate, encode_example
from mondrian_assets.core.training.isolation import run_training_subprocess
from mondrian_assets.core.training.loop import learning_rate_schedule, loss_fn, train_lora
from mondrian_assets.core.training.lora import load_trainable_model
from mondrian_assets.core.training.speed import speed_options
from mondrian_assets.demo.tiny_model import SPEC_FILE, TinyModelSpec, build_tiny_base_model

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
PROMPT = schema.build_prompt("You critique photographs.", "You are Ansel Adams.", "Answer in JSON.")
SMALL = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network: hub offline, no proxies, and in-process sockets refuse to connect."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)

    def refuse(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return original(self, address)

    original = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)


def analysis(i: int) -> str:
    dims = tuple(
        schema.Dimension(name, float(3 + (i + k) % 6), f"{name} reads well.", "Keep it.")
        for k, name in enumerate(schema.DIMENSION_NAMES[:3])
    )
    return schema.canonical_json(
        schema.Analysis(f"Scene {i}.", dims, float(4 + i % 5), ("Light",), ("Focus",), "Zone V.")
    )


def write_split(folder: Path, name: str, start: int, count: int) -> Path:
    rows = []
    for i in range(start, start + count):
        image = folder / "images" / f"{i}.jpg"
        image.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(image)
        rows.append({"images": [str(image)], "messages": schema.chat_messages(PROMPT, analysis(i))})
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    corpus = [PROMPT] + [analysis(i) for i in range(40)]
    base = build_tiny_base_model(root / "base", corpus, spec=SMALL)
    return {
        "root": root,
        "base": base,
        "train": write_split(root, "train", 0, 6),
        "valid": write_split(root, "valid", 100, 3),
    }


@pytest.fixture
def config(data) -> TrainConfig:
    return TrainConfig(
        base_model=str(data["base"]), iters=6, warmup_steps=1, report_interval=1, eval_interval=3, save_interval=2
    )


def test_tiny_model_is_idempotent_and_keeps_special_tokens(data):
    before = (data["base"] / "model.safetensors").stat().st_mtime_ns
    corpus = [PROMPT] + [analysis(i) for i in range(40)]
    assert build_tiny_base_model(data["base"], corpus, spec=SMALL) == data["base"]
    assert (data["base"] / "model.safetensors").stat().st_mtime_ns == before
    assert json.loads((data["base"] / SPEC_FILE).read_text())["spec"]["hidden_size"] == 64

    processor = load_processor(data["base"])
    tokenizer = processor.tokenizer
    assert type(tokenizer).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    for token in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|endoftext|>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    answer = analysis(3)
    assert len(tokenizer.encode(answer, add_special_tokens=False)) * 6 < len(answer)  # > 6 characters a token


def test_answer_only_mask_covers_exactly_the_answer(data, config):
    processor = load_processor(data["base"])
    model_config = json.loads((data["base"] / "config.json").read_text())
    row = json.loads(data["train"].read_text().splitlines()[0])
    example = encode_example(processor, model_config, row, config)

    ids, mask = example.input_ids, example.loss_mask
    image_positions = ids == model_config["image_token_id"]
    assert image_positions.sum() == example.image_grid_thw.prod() // 4 > 0
    assert not mask[image_positions].any()
    first, last = (int(i) for i in np.flatnonzero(mask)[[0, -1]])
    assert mask[first : last + 1].all() and not mask[:first].any() and not mask[last + 1 :].any()
    decode = processor.tokenizer.decode
    prompt_text = decode(ids[:first].tolist())
    assert prompt_text.endswith("<|im_start|>assistant\n") and PROMPT in prompt_text
    assert decode(ids[first : last + 1].tolist()) == row["messages"][1]["content"][0]["text"] + "<|im_end|>"
    assert decode(ids[last + 1 :].tolist()) == "\n"  # the template's newline after the turn is not a target

    everything = encode_example(processor, model_config, row, replace(config, answer_only_loss=False))
    assert everything.loss_mask[: first].sum() > 0 and not everything.loss_mask[image_positions].any()


def test_speed_levers_leave_the_loss_and_its_gradients_unchanged(data, config):
    """Padding to shape buckets, projecting only the target rows and feeding the logits uncast (the GPU defaults)
    compute what the plain full-vocabulary loss computes."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map

    processor = load_processor(data["base"])
    model_config = json.loads((data["base"] / "config.json").read_text())
    rows = [json.loads(line) for line in data["train"].read_text().splitlines()[:3]]
    examples = [encode_example(processor, model_config, row, config) for row in rows]
    plain = speed_options(length_multiple=1, answer_only_projection=False, upcast_logits=True)
    fast = speed_options(length_multiple=16, answer_only_projection=True, upcast_logits=False)
    cuda = speed_options(length_multiple=128, align_input=True, answer_only_projection=True, upcast_logits=False)
    model, _, _ = load_trainable_model(config, fast)
    mx.random.seed(3)  # non-zero B, so every LoRA matrix gets a gradient
    model.update(tree_map(lambda p: 0.05 * mx.random.normal(p.shape), model.trainable_parameters()))
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    results = []
    for options in (plain, fast, cuda):
        batch = collate(examples, processor.tokenizer.pad_token_id, options.length_multiple, options.align_input)
        assert batch["targets"] == sum(int(e.loss_mask[1:].sum()) for e in examples)
        # what the model is fed (the ids less the last) is the multiple when aligned, the padded ids otherwise
        fed = batch["input_ids"].shape[1] - options.align_input
        assert fed % options.length_multiple == 0 and fed < max(len(e.input_ids) for e in examples) + 128
        results.append(loss_and_grad(model, batch, 1.0 / batch["targets"], options))
    (plain_loss, plain_grads), *others = results
    for loss, grads in others:
        assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
        pairs = list(zip(tree_flatten(plain_grads), tree_flatten(grads), strict=True))
        assert len(pairs) == 2 * 7 * SMALL.num_layers
        for (name, a), (_, b) in pairs:
            assert mx.abs(a).max().item() > 0, name
            assert mx.allclose(a, b, rtol=1e-4, atol=1e-6).item(), name


def test_validation_names_the_problem(data, config, tmp_path):
    train, valid = data["train"], data["valid"]
    with pytest.raises(TrainingConfigError, match="does not exist"):
        validate_config(replace(config, base_model=str(tmp_path / "nowhere")), train, valid)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(TrainingConfigError, match="'llama' model"):
        validate_config(replace(config, base_model=str(tmp_path / "other")), train, valid)
    with pytest.raises(TrainingConfigError, match="lora_rank must be greater than or equal to 1"):
        validate_config(replace(config, lora_rank=0), train, valid)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TrainingConfigError, match="empty"):
        validate_config(config, empty, valid)
    with pytest.raises(TrainingConfigError, match="cut image tokens"):
        validate_config(replace(config, max_seq_length=8), train, valid)
    with pytest.raises(TrainingConfigError, match="cut the answer"):
        validate_config(replace(config, max_seq_length=30), train, valid)

    row = json.loads(train.read_text().splitlines()[0])
    two_images = tmp_path / "two.jsonl"
    two_images.write_text(json.dumps({**row, "images": row["images"] * 2}) + "\n")
    with pytest.raises(TrainingConfigError, match="2 image file.* but 1 image part"):
        validate_config(config, two_images, valid)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({**row, "images": [str(tmp_path / "gone.jpg")]}) + "\n")
    with pytest.raises(TrainingConfigError, match="gone.jpg does not exist"):
        validate_config(config, missing, valid)
    validate_config(config, train, valid)  # and the real data passes


def test_adapter_reloads_in_mlx_vlm_and_generates(data, config, tmp_path):
    from mlx_vlm import generate, load
    from mlx_vlm.prompt_utils import apply_chat_template

    reports: list[dict] = []
    out = tmp_path / "adapter"
    result = train_lora(config, data["train"], data["valid"], out, data_version="v1", on_report=reports.append)

    assert result.steps == 6 and result.trainable_params > 0 and not result.stopped_early
    assert result.best_val_loss is not None and result.best_val_loss < result.first_val_loss
    assert [r["step"] for r in reports] == [0, 1, 2, 3, 4, 5, 6]
    assert {"train_loss", "learning_rate", "tokens_per_sec", "peak_memory_gb", "eta_sec"} <= reports[1].keys()
    assert "val_loss" in reports[3] and "val_loss" not in reports[2]
    assert len((out / "training_log.jsonl").read_text().splitlines()) == len(reports)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model"] == str(data["base"]) and adapter_config["data_version"] == "v1"
    assert adapter_config["mondrian_assets_version"] and adapter_config["lora_parameters"]["rank"] == 16
    assert json.loads((out / "training_args.json").read_text())["config"]["iters"] == 6
    assert not (tmp_path / ".adapter.checkpoints").exists()  # cleaned up after success

    model, processor = load(str(data["base"]), adapter_path=str(out))
    row = json.loads(data["valid"].read_text().splitlines()[0])
    prompt = apply_chat_template(processor, model.config, row["messages"][:1], num_images=1)
    text = generate(model, processor, prompt, image=row["images"], max_tokens=8, temperature=0.0).text
    assert text


def test_quantized_base_adapter_reloads(data, config, tmp_path):
    from mlx_vlm import generate, load
    from mlx_vlm.prompt_utils import apply_chat_template

    out = tmp_path / "qlora"
    train_lora(replace(config, iters=2, quantize_bits=8), data["train"], data["valid"], out, data_version="v1")
    assert json.loads((out / "adapter_config.json").read_text())["base_quantization"]
    model, processor = load(str(data["base"]), adapter_path=str(out))  # re-quantizes the base as trained
    row = json.loads(data["valid"].read_text().splitlines()[0])
    prompt = apply_chat_template(processor, model.config, row["messages"][:1], num_images=1)
    assert generate(model, processor, prompt, image=row["images"], max_tokens=4, temperature=0.0).text


def test_resume_after_sigkill_ends_where_an_uninterrupted_run_ends(data, config, tmp_path):
    from safetensors.numpy import load_file

    config = replace(config, iters=12, lora_dropout=0.1)  # dropout: the resumed run must redraw the same masks
    reference = train_lora(config, data["train"], data["valid"], tmp_path / "ref", data_version="v1")

    out = tmp_path / "run" / "adapter"
    child: list[int] = []

    def kill_midway(report: dict) -> None:
        if report["step"] == 5:
            os.kill(child[0], signal.SIGKILL)

    with pytest.raises(TrainingFailed, match="SIGKILL") as failure:
        run_training_subprocess(
            config, data["train"], data["valid"], out, data_version="v1",
            on_report=kill_midway, on_start=child.append,
        )  # fmt: skip
    assert failure.value.returncode == -signal.SIGKILL
    assert not out.exists() and any((out.parent / ".adapter.checkpoints").iterdir())

    resumed = run_training_subprocess(config, data["train"], data["valid"], out, data_version="v1")
    assert resumed.resumed_from_step >= 4 and resumed.steps == 12
    assert resumed.best_step == reference.best_step
    assert resumed.best_val_loss == pytest.approx(reference.best_val_loss, rel=1e-5)
    expected = load_file(str(tmp_path / "ref" / "adapters.safetensors"))
    got = load_file(str(out / "adapters.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-6)
    steps = [r["step"] for r in map(json.loads, (out / "training_log.jsonl").read_text().splitlines())]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # no duplicated or lost report lines


def test_a_failing_child_raises_and_leaves_the_caller_alive(data, config, tmp_path):
    import shutil

    with pytest.raises(TrainingConfigError, match="no_such_proj"):
        run_training_subprocess(
            replace(config, target_modules=("no_such_proj",)), data["train"], data["valid"], tmp_path / "a",
            data_version="v1",
        )  # fmt: skip
    broken = tmp_path / "broken-base"
    shutil.copytree(data["base"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # MLX cannot read it: the child fails, we do not
    with pytest.raises(TrainingFailed, match="training failed") as failure:
        run_training_subprocess(
            replace(config, base_model=str(broken)), data["train"], data["valid"], tmp_path / "b", data_version="v1"
        )
    assert failure.value.returncode == 1 and "Traceback" in failure.value.stderr_tail


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_every_schedule_yields_arrays_the_optimizer_accepts(schedule):
    config = TrainConfig(base_model="unused", learning_rate=1e-3, warmup_steps=4, lr_schedule=schedule)
    rates = [float(learning_rate_schedule(config, 20)(mx.array(step)).item()) for step in (0, 3, 10, 19)]
    assert rates[0] == pytest.approx(1e-3 / 4) and rates[1] == pytest.approx(1e-3)
    assert (rates[3] < rates[2] < rates[1]) if schedule == "cosine" else rates[2] == rates[3] == pytest.approx(1e-3)


def test_a_checkpoint_of_another_run_is_never_resumed(data, config, tmp_path):
    out = tmp_path / "adapter"
    first = train_lora(config, data["train"], data["valid"], out, data_version="v1", keep_checkpoints=True)
    root = tmp_path / ".adapter.checkpoints"
    assert (root / first.fingerprint / "step_0000006").is_dir()  # kept for the caller's checks

    # another run (a new seed) finds the first run's checkpoint in its own folder, as a copy or a hash collision
    # would put it there: it must train from the start, not continue someone else's weights and optimizer
    other = replace(config, seed=1)
    other_fingerprint = run_fingerprint(other, data["train"], data["valid"], "v1")
    assert other_fingerprint != first.fingerprint
    shutil.copytree(root / first.fingerprint, root / other_fingerprint)
    assert train_lora(other, data["train"], data["valid"], out, data_version="v1").resumed_from_step == 0

    again = train_lora(config, data["train"], data["valid"], out, data_version="v1")  # its own: resumed, at the end
    assert again.resumed_from_step == 6 and again.best_val_loss == first.best_val_loss
    assert not (root / first.fingerprint).exists()


def test_on_metal_memory_is_wired_and_the_cache_cleared_each_step(data, config, tmp_path, monkeypatch):
    """As mlx-vlm's trainer does on Apple GPUs; no Metal here, so the device's answers are stood in for."""
    calls: dict[str, list] = {"wired": [], "cleared": []}
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 123_456_789})
    monkeypatch.setattr(mx, "set_wired_limit", lambda limit: calls["wired"].append(limit))
    monkeypatch.setattr(mx, "clear_cache", lambda: calls["cleared"].append(1))
    train_lora(replace(config, iters=3), data["train"], None, tmp_path / "adapter", data_version="v1")
    assert calls["wired"] == [123_456_789] and len(calls["cleared"]) == 3


def test_an_mlx_quantized_base_trains_and_reloads(data, config, tmp_path):
    from mlx_vlm import generate, load
    from mlx_vlm.convert import convert
    from mlx_vlm.prompt_utils import apply_chat_template

    quantized = tmp_path / "base-8bit"
    convert(str(data["base"]), str(quantized), quantize=True, q_bits=8, q_group_size=64)  # as mlx-community ships
    assert resolve_base(quantized).quantization["bits"] == 8
    on_quantized = replace(config, base_model=str(quantized), iters=2)
    with pytest.raises(TrainingConfigError, match="already quantized"):
        validate_config(replace(on_quantized, quantize_bits=4), data["train"], data["valid"])
    validate_config(on_quantized, data["train"], data["valid"])

    out = tmp_path / "adapter"
    result = train_lora(on_quantized, data["train"], data["valid"], out, data_version="v1")
    assert result.trainable_params > 0
    model, processor = load(str(quantized), adapter_path=str(out))
    row = json.loads(data["valid"].read_text().splitlines()[0])
    prompt = apply_chat_template(processor, model.config, row["messages"][:1], num_images=1)
    assert generate(model, processor, prompt, image=row["images"], max_tokens=4, temperature=0.0).text
