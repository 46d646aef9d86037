"""Schema-valid JSON as a serving guarantee: a grammar of the canonical analysis masks the logits at each step.

llguidance computes the allowed-token bitmask on the CPU (its numpy API); the mask is applied with plain MLX ops,
so the same code runs on Metal, CUDA and the CPU (mlx-vlm's own structured path uses a Metal-only kernel).
The grammar is the canonical form `schema.canonical_json` writes: keys in canonical order, no whitespace,
dimensions a non-empty subsequence of `schema.DIMENSION_NAMES` in canonical order (so names are unique), scores
and the overall score within the schema's range, non-empty texts and lists. Anything this grammar accepts,
`schema.parse_analysis` accepts; the only way out is running out of tokens (then the answer is cut off, and
reported as such).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection
from typing import Any

import mlx.core as mx
import numpy as np

from mondrian_assets.core import schema

END_OF_TURN = "<|im_end|>"  # the chat template's end of the answer (tokenizer.json alone would pick <|endoftext|>)

_COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
_TEXT = {"type": "string", "minLength": 1, "pattern": r"^\S(.*\S)?$"}
_SCORE = {"type": "number", "minimum": schema.SCORE_MIN, "maximum": schema.SCORE_MAX}
_CASE_STUDY_FIELDS = ("image_title", "year", "dimension", "explanation")


def _json_rule(value_schema: dict) -> str:
    return "%json " + json.dumps({**value_schema, "x-guidance": _COMPACT})


def _key(name: str) -> str:
    """The grammar literal for `"name":`."""
    return json.dumps(json.dumps(name) + ":")


def _dimension_schema(name: str) -> dict:
    return {
        "type": "object",
        "properties": {
            "name": {"const": name},
            "score": _SCORE,
            "comment": _TEXT,
            "recommendation": _TEXT,
            "case_study_id": _TEXT,
            "quote_id": _TEXT,
        },
        "required": ["name", "score", "comment", "recommendation"],
        "additionalProperties": False,
    }


@functools.cache
def analysis_grammar() -> str:
    """The canonical analysis as an llguidance Lark grammar."""
    n = len(schema.DIMENSION_NAMES)
    # first_k: a non-empty ordered pick from dimensions k..n-1; after_k: a possibly empty one, each after a comma
    dims = []
    for k, name in enumerate(schema.DIMENSION_NAMES):
        last = k + 1 == n
        dims.append(f"dim_{k}: {_json_rule(_dimension_schema(name))}")
        dims.append(f"first_{k}: dim_{k}" + ("" if last else f" after_{k + 1} | first_{k + 1}"))
        dims.append(f'after_{k}: ("," dim_{k})?' + ("" if last else f" after_{k + 1}"))
    text_list = {"type": "array", "items": _TEXT, "minItems": 1}
    case_studies = {
        "type": "array",
        "maxItems": schema.MAX_CASE_STUDIES,
        "items": {
            "type": "object",
            "properties": {f: _TEXT for f in _CASE_STUDY_FIELDS},
            "required": list(_CASE_STUDY_FIELDS),
            "additionalProperties": False,
        },
    }
    start = " ".join(
        [
            '"{"', _key("image_description"), "text",
            '","', _key("dimensions"), '"[" first_0 "]"',
            '","', _key("overall_score"), "score",
            '","', _key("key_strengths"), "text_list",
            '","', _key("priority_improvements"), "text_list",
            '","', _key("technical_notes"), "notes",
            f'("," {_key("case_studies")} case_studies)?',
            '"}"',
        ]
    )  # fmt: skip
    rules = [
        f"start: {start}",
        f"text: {_json_rule(_TEXT)}",
        f"score: {_json_rule(_SCORE)}",
        f"text_list: {_json_rule(text_list)}",
        f"notes: {_json_rule({'type': 'string'})}",
        f"case_studies: {_json_rule(case_studies)}",
        *dims,
    ]
    return "\n".join(rules)


class GrammarError(RuntimeError):
    """The grammar could not be built for this tokenizer, or the matcher left it."""


class AnalysisConstraint:
    """A tokenizer's compiled view of the analysis grammar; `processor()` gives a fresh per-request mask."""

    def __init__(self, tokenizer_json: str, end_of_turn_id: int):
        import llguidance

        self._tokenizer = llguidance.LLTokenizer(tokenizer_json, eos_token=end_of_turn_id)
        self._grammar = llguidance.LLMatcher.grammar_from_lark(analysis_grammar())
        problem = llguidance.LLMatcher.validate_grammar(self._grammar, self._tokenizer)
        if problem:
            raise GrammarError(f"the analysis grammar does not compile: {problem}")
        self.end_of_turn_id = end_of_turn_id

    @classmethod
    def for_processor(cls, processor: Any) -> AnalysisConstraint:
        tokenizer = getattr(processor, "tokenizer", processor)
        end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if not isinstance(end, int) or end < 0:
            raise GrammarError(f"the tokenizer has no {END_OF_TURN} token")
        backend = tokenizer.backend_tokenizer  # a fast tokenizer, as every Qwen3-VL ships
        return cls(backend.to_str(), end)

    def processor(self) -> GrammarMask:
        import llguidance

        return GrammarMask(llguidance.LLMatcher(self._tokenizer, self._grammar), self._tokenizer.vocab_size)

    def accepts(self, text: str) -> bool:
        """Whether `text` followed by the end of turn is a complete sentence of the grammar."""
        import llguidance

        matcher = llguidance.LLMatcher(self._tokenizer, self._grammar)
        tokens = self._tokenizer.tokenize_str(text)
        return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.consume_token(self.end_of_turn_id)


class GrammarMask:
    """mlx-vlm logits processor for one generation: feeds each sampled token to the matcher, then keeps only the
    tokens the grammar allows next (the first call, right after prefill, has sampled nothing yet). Logits wider
    than the tokenizer's vocabulary (padded embeddings) are masked past its end.

    `corrections` counts the steps where the model's own greedy choice was not allowed: with greedy decoding,
    0 means the unconstrained answer would have been exactly this one (what the model learned, not the grammar).
    """

    def __init__(self, matcher: Any, vocab_size: int):
        import llguidance.numpy

        self._matcher = matcher
        self._fill = llguidance.numpy.fill_next_token_bitmask
        self._words = llguidance.numpy.allocate_token_bitmask(1, vocab_size)
        self._bit = mx.arange(32, dtype=mx.uint32)
        self._own_choice: mx.array | None = None
        self.corrections = 0

    def settle(self, stop_ids: Collection[int]) -> None:
        """Count the last step too: generation stops on an end token without calling the processor again, and
        the model stopping on any of its end tokens is the same answer."""
        if self._own_choice is not None:
            self.corrections += int(self._own_choice.item()) not in stop_ids
            self._own_choice = None

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        if self._own_choice is not None:
            token = int(history[-1].item())
            self.corrections += int(self._own_choice.item()) != token
            if not self._matcher.consume_token(token):
                raise GrammarError(f"the grammar rejected a sampled token: {self._matcher.get_error()}")
        self._fill(self._matcher, self._words)
        words = mx.array(self._words.view(np.uint32))
        allowed = ((words[:, :, None] >> self._bit) & 1).astype(mx.bool_).reshape(1, -1)
        width = logits.shape[-1]
        if allowed.shape[-1] >= width:
            allowed = allowed[:, :width]
        else:
            allowed = mx.concatenate([allowed, mx.zeros((1, width - allowed.shape[-1]), dtype=mx.bool_)], axis=-1)
        self._own_choice = mx.argmax(logits, axis=-1)
        return mx.where(allowed, logits, mx.array(-np.inf, dtype=logits.dtype))
