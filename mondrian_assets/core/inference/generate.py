"""Run the base model or the base plus a LoRA adapter over validation examples, the way serving will.

- The prompt is built exactly as in training: `schema.chat_messages` (user turn = image, then text) through
  mlx-vlm's chat template.
- The adapter is verified (every saved tensor must land on a model parameter, so a mismatched adapter cannot
  silently leave the base model in place) and then fused into the weights: unfused LoRA decodes far slower.
- Decoding is greedy by default and seeded, except score values: with `expected_scores` (the default) each is the
  allowed value nearest the expected value of the model's belief (`score_decoding`). A loop guard stops an output
  once its tail repeats (`records.TOKEN_LOOP_RULE`), so a looping model costs seconds, not `max_tokens`.
- `batch_size > 1` uses mlx-vlm's `batch_generate` (same greedy tokens as one-by-one on Qwen3-VL, see
  bench/bench_batched_generation.py); latency per example is then the batch's wall time.
"""


from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from mondrian_assets.core import schema
from mondrian_assets.core.inference.constrained import GrammarMask
from mondrian_assets.core.inference.loading import LoadedModel
from mondrian_assets.core.inference.records import TOKEN_LOOP_RULE, EvalExample, Generation, LoopRule, ends_in_loop
from mondrian_assets.core.inference.score_decoding import (
    LOOK_AHEAD,
    ExpectedScore,
    cache_look_ahead,
    only_token,
    score_rule,
)

# --- examples ------------------------------------------------------------------------------------------------


def _example_id(record: dict, index: int) -> str:
    for key in ("job_id", "id", "example_id"):
        if record.get(key):
            return str(record[key])
    return f"{index:04d}-{Path(str(record['image_path'])).stem}"


def load_eval_examples(path: Path, *, base_dir: Path | None = None, limit: int | None = None) -> list[EvalExample]:
    """Read a `training_data_<adv>_val.json` list of `{image_path, prompt, response}`. Relative image paths are
    resolved against `base_dir` (default: the file's folder)."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    root = base_dir or Path(path).parent
    examples = []
    for i, record in enumerate(records[:limit] if limit is not None else records):
        image = Path(str(record["image_path"]))
        examples.append(
            EvalExample(
                example_id=_example_id(record, i),
                image_path=image if image.is_absolute() else root / image,
                prompt=str(record["prompt"]),
                reference=str(record["response"]),
            )
        )
    return examples


# --- prompts and budgets ---------------------------------------------------------------------------------------


def formatted_prompt(loaded: LoadedModel, prompt: str) -> str:
    """The full chat-template text for one example, as the trainer formats it (without the answer)."""
    from mlx_vlm.prompt_utils import apply_chat_template

    return str(apply_chat_template(loaded.processor, loaded.model.config, schema.chat_messages(prompt), num_images=1))


def max_tokens_for(loaded: LoadedModel, references: Sequence[str], *, margin: float = 0.25, extra: int = 32) -> int:
    """Room for the longest reference answer in tokens, plus `margin` of it plus `extra` tokens."""
    longest = max((len(loaded.tokenizer.encode(r, add_special_tokens=False)) for r in references), default=0)
    return int(math.ceil(longest * (1.0 + margin))) + extra


def eos_ids(loaded: LoadedModel) -> list[int]:
    eos = getattr(loaded.model.config, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if not ids and getattr(loaded.tokenizer, "eos_token_id", None) is not None:
        ids = [loaded.tokenizer.eos_token_id]
    return [int(i) for i in ids]


def _reset_stopping(loaded: LoadedModel) -> None:
    criteria = getattr(loaded.tokenizer, "stopping_criteria", None)
    if criteria is not None:
        criteria.reset(eos_ids(loaded))


def _detokenize(loaded: LoadedModel, tokens: Sequence[int]) -> str:
    """Text of generated tokens, decoded the way mlx-vlm's batch path does (so both paths compare equal)."""
    detokenizer = loaded.processor.detokenizer
    detokenizer.reset()
    for token in tokens:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return str(detokenizer.text)


# --- the loop guard ------------------------------------------------------------------------------------------


@dataclass
class LoopGuard:
    """Per-sequence logits processor: once the generated tail loops, force end-of-sequence.

    Also records the generated tokens, which mlx-vlm's batch API does not return per row. The first call
    (after prefill) sees only the prompt, which is ignored: an image's repeated pad tokens are not a loop.
    """

    eos_id: int
    rule: LoopRule = TOKEN_LOOP_RULE
    tokens: list[int] = field(default_factory=list)
    fired: bool = False
    _primed: bool = False

    def clone(self) -> LoopGuard:
        return LoopGuard(self.eos_id, self.rule)

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        if not self._primed:
            self._primed = True
            return logits
        return self.process_last_token(int(history[-1].item()), logits)

    def process_last_token(self, token: int, logits: mx.array) -> mx.array:
        self.tokens.append(token)
        if self.fired or ends_in_loop(self.tokens, self.rule):
            self.fired = True
            return only_token(self.eos_id, logits)
        return logits


# --- generation ----------------------------------------------------------------------------------------------

def decoding_label(expected_scores: bool, tokenizer: Any, temperature: float = 0.0) -> str:
    """How generation decoded, as evaluation reports it and the registry keys cached evaluations by (outcomes
    decoded another way never compare). It names the score rule `tokenizer` gets, and says greedy where it gets
    none."""
    tokens = "greedy" if temperature == 0 else f"sampled at temperature {temperature}"
    if not expected_scores:
        return tokens
    rule = score_rule(tokenizer)
    if rule is None:
        return tokens + "; score values: greedy too (this tokenizer's numbers allow no expected-value rule)"
    return tokens + "; score values: the expected value of the model's belief" + (
        " (each value's tokens looked ahead)" if rule == LOOK_AHEAD else "")  # fmt: skip


def _one(
    loaded: LoadedModel, example: EvalExample, max_tokens: int, temperature: float, seed: int, rule: LoopRule,
    expected_scores: bool,
) -> Generation:  # fmt: skip
    return generate_one(
        loaded, example.image_path, example.prompt, max_tokens=max_tokens, temperature=temperature, seed=seed,
        loop_rule=rule, expected_scores=expected_scores,
    )  # fmt: skip


def generate_one(
    loaded: LoadedModel,
    image_path: Path,
    prompt: str,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    loop_rule: LoopRule = TOKEN_LOOP_RULE,
    logits_processors: Sequence[Callable[[mx.array, mx.array], mx.array]] = (),
    expected_scores: bool = True,
    score_decoder: type[ExpectedScore] = ExpectedScore,
) -> Generation:
    """One analysis for one image, with the loop guard; `logits_processors` (e.g. serving's grammar mask) see
    every step's logits, before score values are chosen (by `score_decoder`, which a benchmark may replace). Under a
    grammar mask there is no loop guard: the grammar closes the answer within `max_tokens` itself, and cutting a loop
    would only leave it unfinished."""
    from mlx_vlm import stream_generate
    from mlx_vlm.models.cache import make_prompt_cache

    # our own KV cache, so that a score value's look-ahead can continue from it (on copies)
    prompt_cache = make_prompt_cache(loaded.model.language_model)
    scores = score_decoder(loaded.tokenizer, cache_look_ahead(loaded.model.language_model, prompt_cache))
    if expected_scores:
        logits_processors = [*logits_processors, scores]
    guard = None if any(isinstance(p, GrammarMask) for p in logits_processors) else loop_rule
    mx.random.seed(seed)
    _reset_stopping(loaded)
    tokens: list[int] = []
    reason, prompt_tokens, prompt_tps, gen_tps = "length", 0, 0.0, 0.0
    tic = time.perf_counter()
    stream = stream_generate(
        loaded.model,
        loaded.processor,
        formatted_prompt(loaded, prompt),
        image=[str(image_path)],
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        prompt_cache=prompt_cache,
        **({"logits_processors": list(logits_processors)} if logits_processors else {}),
    )
    for response in stream:
        prompt_tokens, prompt_tps = response.prompt_tokens, response.prompt_tps
        if response.finish_reason is not None:
            reason = response.finish_reason
            break
        if response.token is None:
            break
        tokens.append(int(response.token))
        gen_tps = response.generation_tps
        if guard is not None and ends_in_loop(tokens, guard):
            reason = "repetition"
            break
    stream.close()
    latency = time.perf_counter() - tic
    return Generation(_detokenize(loaded, tokens), latency, prompt_tokens, prompt_tps, len(tokens), gen_tps, reason,
                      score_values_by_rule=scores.chosen)  # fmt: skip


def _prompt_token_count(loaded: LoadedModel, example: EvalExample) -> int:
    from mlx_vlm import prepare_inputs
    from mlx_vlm.utils import should_add_special_tokens

    inputs = prepare_inputs(
        loaded.processor,
        images=[str(example.image_path)],
        prompts=[formatted_prompt(loaded, example.prompt)],
        image_token_index=getattr(loaded.model.config, "image_token_index", None),
        add_special_tokens=should_add_special_tokens(loaded.model.config.model_type, loaded.processor),
    )
    return int(inputs["input_ids"].shape[1])


def _batch(
    loaded: LoadedModel, examples: Sequence[EvalExample], max_tokens: int, temperature: float, seed: int,
    rule: LoopRule, expected_scores: bool,
) -> list[Generation]:  # fmt: skip
    from mlx_vlm import batch_generate
    from mlx_vlm.sample_utils import make_sampler

    mx.random.seed(seed)
    _reset_stopping(loaded)
    guards = [LoopGuard(eos_ids(loaded)[0], rule) for _ in examples]
    scores = [ExpectedScore(loaded.tokenizer) for _ in examples]
    kwargs: dict[str, Any] = {"sampler": make_sampler(temp=temperature)} if temperature > 0 else {}
    tic = time.perf_counter()
    result = batch_generate(
        loaded.model,
        loaded.processor,
        images=[str(e.image_path) for e in examples],
        prompts=[e.prompt for e in examples],  # batch_generate applies the chat template itself
        max_tokens=max_tokens,
        logits_processors=[[g, e] if expected_scores else [g] for g, e in zip(guards, scores, strict=True)],
        **kwargs,
    )
    latency = time.perf_counter() - tic
    stats = result.stats
    out = []
    eos = set(eos_ids(loaded))
    for example, text, guard, score in zip(examples, result.texts, guards, scores, strict=True):
        # the guard saw every emitted token, the stopping EOS included
        stopped = bool(guard.tokens) and guard.tokens[-1] in eos
        n_tokens = len(guard.tokens) - stopped
        reason = "repetition" if guard.fired else "stop" if stopped else "length"
        out.append(
            Generation(
                text=str(text),
                latency_s=latency,
                prompt_tokens=_prompt_token_count(loaded, example),
                prompt_tps=float(stats.prompt_tps),
                generation_tokens=n_tokens,
                generation_tps=float(stats.generation_tps),
                finish_reason=reason,
                batched=True,
                score_values_by_rule=score.chosen,
            )
        )
    return out


def _batch_prompt_matches(loaded: LoadedModel, prompt: str) -> bool:
    """batch_generate templates a plain string prompt; it must equal our chat_messages formatting."""
    from mlx_vlm.prompt_utils import apply_chat_template

    plain = apply_chat_template(loaded.processor, loaded.model.config, prompt, num_images=1)
    return str(plain) == formatted_prompt(loaded, prompt)


def run_settings(
    loaded: LoadedModel,
    *,
    max_tokens: int,
    seed: int,
    batch_size: int,
    temperature: float = 0.0,
    loop_rule: LoopRule = TOKEN_LOOP_RULE,
    expected_scores: bool = True,
) -> dict:
    """What a rerun needs to reproduce `generate_analyses`: decoding settings, dtype, device and versions."""
    import importlib.metadata as metadata

    first = next(v for _, v in tree_flatten(loaded.model.parameters()) if mx.issubdtype(v.dtype, mx.floating))
    return {
        "decoding": decoding_label(expected_scores, loaded.tokenizer, temperature),
        "max_tokens": max_tokens,
        "seed": seed,
        "batch_size": batch_size,
        "loop_guard": dataclasses.asdict(loop_rule),
        "adapter_fused_layers": loaded.fused_layers,
        "dtype": str(first.dtype),
        "device": str(mx.default_device()),
        "mlx": metadata.version("mlx"),
        "mlx_vlm": metadata.version("mlx-vlm"),
    }


def generate_analyses(
    loaded: LoadedModel,
    examples: Sequence[EvalExample],
    *,
    max_tokens: int,
    seed: int = 0,
    batch_size: int = 1,
    temperature: float = 0.0,
    loop_rule: LoopRule = TOKEN_LOOP_RULE,
    warmup: bool = True,
    progress: Callable[[int, int], None] | None = None,
    expected_scores: bool = True,
) -> list[Generation]:
    """One `Generation` per example, in order. `batch_size > 1` batches with mlx-vlm's batch_generate when
    its prompt formatting matches training's; otherwise (or with batch_size 1) examples run one by one.
    `warmup` first runs a few untimed tokens, so one-time setup does not land in the first example's latency
    (and in whichever model happens to be evaluated first)."""
    if not examples:
        return []
    if warmup:
        _one(loaded, examples[0], min(8, max_tokens), temperature, seed, loop_rule, expected_scores)
    # a look-ahead continues a sequence's own KV cache, which mlx-vlm's batch path does not hand out
    looks_ahead = expected_scores and score_rule(loaded.tokenizer) == LOOK_AHEAD
    batched = batch_size > 1 and not looks_ahead and all(
        _batch_prompt_matches(loaded, p) for p in {e.prompt for e in examples})  # fmt: skip
    step = batch_size if batched else 1
    out: list[Generation] = []
    for start in range(0, len(examples), step):
        chunk = examples[start : start + step]
        if batched:
            out.extend(_batch(loaded, chunk, max_tokens, temperature, seed, loop_rule, expected_scores))
        else:
            out.append(_one(loaded, chunk[0], max_tokens, temperature, seed, loop_rule, expected_scores))
        if progress is not None:
            progress(len(out), len(examples))
    return out
