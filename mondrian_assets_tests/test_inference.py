"""Inference on the real tiny Qwen3-VL checkpoint: prompts, fused adapters, batching, stopping, the loop guard."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from mondrian_assets.core import schema
from mondrian_assets.core.evaluation.gates import evaluate_gates
from mondrian_assets.core.evaluation.metrics import compare
from mondrian_assets.core.evaluation.overhead import measure_overhead
from mondrian_assets.core.evaluation.run import EvalSettings
from mondrian_assets.core.inference import generate as inf
from mondrian_assets.core.inference import loading
from mondrian_assets.core.inference.records import EvalExample, Generation, LoopRule
from mondrian_assets.demo.tiny_model import build_tiny_base_model
from helpers import analysis_json, random_adapter, random_image

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inference")


@pytest.fixture(scope="module")
def base_path(workdir) -> str:
    prompt = schema.build_prompt(None, "You are Ansel Adams.")
    corpus = [prompt, *(analysis_json(s) for s in range(3, 11))]
    return str(build_tiny_base_model(workdir / "base", corpus, seed=0))


@pytest.fixture(scope="module")
def examples(workdir) -> list[EvalExample]:
    prompt = schema.build_prompt(None, "You are Ansel Adams.")
    return [EvalExample(f"ex{i}", random_image(workdir / f"photo{i}.jpg", size, seed=i), prompt, analysis_json(6 + i))
            for i, size in enumerate([(96, 72), (64, 96)])]  # fmt: skip


@pytest.fixture(scope="module")
def adapter_dir(workdir, base_path) -> Path:
    return random_adapter(Path(base_path), workdir / "adapter")


@pytest.fixture(scope="module")
def base(base_path) -> loading.LoadedModel:
    return loading.load_for_inference(base_path, None)


@pytest.fixture(scope="module")
def tuned(base_path, adapter_dir) -> loading.LoadedModel:
    return loading.load_for_inference(base_path, adapter_dir)


def test_generate_analyses_on_two_images(base, examples):
    first = inf.generate_analyses(base, examples, max_tokens=MAX_TOKENS, seed=0)
    assert len(first) == 2
    for g in first:
        assert g.finish_reason in {"stop", "length", "repetition"}
        assert 0 < g.prompt_tokens and 0 < g.generation_tokens <= MAX_TOKENS
        assert g.latency_s > 0 and g.prompt_tps > 0 and g.generation_tps > 0
        assert not g.batched
    again = inf.generate_analyses(base, examples, max_tokens=MAX_TOKENS, seed=0, warmup=False)
    assert [g.text for g in again] == [g.text for g in first]  # greedy and seeded: reproducible


def test_run_settings_record_what_a_rerun_needs(tuned):
    settings = inf.run_settings(tuned, max_tokens=64, seed=3, batch_size=4)
    assert settings["decoding"] == inf.decoding_label(True, tuned.tokenizer) and settings["seed"] == 3
    assert settings["adapter_fused_layers"] > 0
    assert settings["dtype"] == "mlx.core.float32" and settings["mlx_vlm"] == "0.7.10"
    json.dumps(settings)


def test_prompt_is_the_training_chat_format(base):
    text = inf.formatted_prompt(base, "Rate it.")
    user = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Rate it.<|im_end|>\n"
    assert text == user + "<|im_start|>assistant\n"


def test_max_tokens_covers_the_longest_analysis_json(base, examples):
    longest = max(len(base.tokenizer.encode(e.reference, add_special_tokens=False)) for e in examples)
    assert inf.max_tokens_for(base, [e.reference for e in examples]) >= longest * 1.25


def test_fused_adapter_equals_unfused_and_differs_from_base(base, tuned, base_path, adapter_dir):
    assert tuned.fused_layers > 0
    unfused = loading.load_for_inference(base_path, adapter_dir, fuse=False)
    tokens = mx.array([[5, 17, 42, 99, 3, 7]])
    fused_logits = tuned.model.language_model(tokens).logits
    assert mx.allclose(fused_logits, unfused.model.language_model(tokens).logits, atol=1e-4).item()
    assert not mx.allclose(fused_logits, base.model.language_model(tokens).logits, atol=1e-2).item()


def test_adapter_that_does_not_match_the_model_is_refused(base_path, adapter_dir, tmp_path):
    weights = mx.load(str(adapter_dir / "adapters.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    renamed = {k.replace("layers", "blocks"): v for k, v in weights.items()}  # keys no model parameter has
    mx.save_safetensors(str(broken / "adapters.safetensors"), renamed)
    with pytest.raises(loading.AdapterNotApplied):
        loading.load_for_inference(base_path, broken)


def test_batched_generation_matches_one_by_one(tuned, examples):
    one = inf.generate_analyses(tuned, examples, max_tokens=MAX_TOKENS, warmup=False)
    batched = inf.generate_analyses(tuned, examples, max_tokens=MAX_TOKENS, batch_size=2, warmup=False)
    assert [g.text for g in batched] == [g.text for g in one]
    assert [g.generation_tokens for g in batched] == [g.generation_tokens for g in one]
    assert [g.finish_reason for g in batched] == [g.finish_reason for g in one]
    assert [g.prompt_tokens for g in batched] == [g.prompt_tokens for g in one]
    assert all(g.batched for g in batched)


def test_end_of_sequence_stops_both_paths(base_path, examples):
    silent = loading.load_for_inference(base_path, None)
    norm = silent.model.language_model.model.norm
    norm.weight = mx.zeros_like(norm.weight)  # all logits 0: argmax is token 0, <|endoftext|>, an EOS id
    for batch_size in (1, 2):
        out = inf.generate_analyses(silent, examples, max_tokens=MAX_TOKENS, batch_size=batch_size, warmup=False)
        assert [(g.text, g.generation_tokens, g.finish_reason) for g in out] == [("", 0, "stop")] * 2


def test_overhead_runs_decode_the_same_number_of_tokens_even_past_end_of_sequence(base, base_path, examples):
    silent = loading.load_for_inference(base_path, None)
    norm = silent.model.language_model.model.norm
    norm.weight = mx.zeros_like(norm.weight)  # left alone it would stop at once (see above)
    measured = measure_overhead(base, silent, examples, repeats=2, tokens=8)
    assert len(measured.base_s) == len(measured.tuned_s) == 2 and measured.pairs == 4
    assert all(t > 0 for row in measured.base_s + measured.tuned_s for t in row)
    with pytest.raises(ValueError, match="two repeats"):
        measure_overhead(base, silent, examples, repeats=1, tokens=8)


@pytest.mark.slow
def test_overhead_gate_never_fires_on_two_identical_models(base, base_path, examples):
    """Same weights, a separate copy: ten evaluations' worth of overhead measurements on this (shared, noisy)
    machine must never block the candidate."""
    twin = loading.load_for_inference(base_path, None)
    defaults = EvalSettings()
    for _ in range(10):
        measured = measure_overhead(base, twin, examples[: defaults.overhead_prompts],
                                    repeats=defaults.overhead_repeats, tokens=defaults.overhead_tokens)  # fmt: skip
        print(f"overhead {measured.overhead:+.3f}, noise {measured.noise:.3f}")
        outputs = [Generation(e.reference, 1.0, 10, 10.0, 10, 10.0) for e in examples]
        comparison = compare(examples, outputs, outputs, [], overhead=measured)
        result = next(g for g in evaluate_gates(comparison) if g.name == "inference_overhead")
        assert result.passed, result.message


def test_loop_guard_forces_end_of_sequence():
    guard = inf.LoopGuard(eos_id=0, rule=LoopRule(max_period=4, min_repeats=3, min_span=6))
    logits = mx.ones((1, 10))
    assert guard(mx.array([3, 3, 3, 3, 3, 3, 3]), logits) is logits  # the prompt is never a loop
    for token in [5, 6, 5, 6, 5]:
        assert guard.process_last_token(token, logits) is logits
    forced = guard.process_last_token(6, logits)
    assert guard.fired and int(mx.argmax(forced, axis=-1).item()) == 0
    assert guard.clone().tokens == [] and not guard.clone().fired


def test_load_eval_examples_resolves_relative_images(tmp_path):
    records = [
        {"image_path": "images/a.jpg", "prompt": "p", "response": "{}", "job_id": "j1"},
        {"image_path": "/abs/b.jpg", "prompt": "q", "response": "{}"},
    ]
    path = tmp_path / "training_data_ansel_val.json"
    path.write_text(json.dumps(records))
    loaded = inf.load_eval_examples(path)
    assert loaded[0] == EvalExample("j1", tmp_path / "images/a.jpg", "p", "{}")
    assert loaded[1].image_path == Path("/abs/b.jpg") and loaded[1].example_id == "0001-b"
    assert len(inf.load_eval_examples(path, limit=1)) == 1


def test_constrained_compliance_redecodes_only_what_the_grammar_would_change(base, examples):
    """A canonical answer stands as it is (greedy under the mask gives the same text); a valid but spaced one and
    the untrained base's own answer are decoded again under the mask, which ends each one valid or cut off."""
    from mondrian_assets.core.evaluation.constrained_compliance import constrained_compliance

    canonical = schema.canonical_json(schema.parse_analysis(analysis_json(7.0)).analysis)
    own = inf.generate_analyses(base, examples[1:], max_tokens=MAX_TOKENS, warmup=False)
    assert not schema.parse_analysis(own[0].text).ok  # the untrained base writes no analysis
    cases = [*examples, examples[0]]
    generations = [Generation(canonical, 0.1, 1, 1.0, 1, 1.0), own[0], Generation(analysis_json(7.0), 0.1, 1, 1.0, 1, 1.0)]
    result = constrained_compliance(base, cases, generations, max_tokens=400, seed=0, expected_scores=True,
                                    timing_prompts=2, repeats=2, tokens=6, log=lambda _: None)  # fmt: skip
    assert (result.examples, result.valid_unconstrained, result.accepted_as_is, result.redecoded) == (3, 2, 1, 2)
    assert result.valid_constrained + result.cut_off == 3  # the grammar's promise: valid unless out of tokens
    assert result.valid_constrained >= 1  # the canonical one; the untrained model's re-decodes may run out of tokens
    assert result.timing.pairs == 4 and result.decode_speed_ratio > 0
    assert result.as_dict()["format_compliance_unconstrained"] == pytest.approx(2 / 3)
