"""Schema-valid JSON that always closes within the token budget: a grammar of the canonical analysis masks the
logits at each step.

llguidance computes the allowed-token bitmask on the CPU (its numpy API); the mask is applied with plain MLX ops,
so the same code runs on Metal, CUDA and the CPU (mlx-vlm's own structured path uses a Metal-only kernel).
The grammar is the canonical form `schema.canonical_json` writes: keys in canonical order, no whitespace,
dimensions a non-empty subsequence of `schema.DIMENSION_NAMES` in canonical order (so names are unique), scores
within the schema's range with at most one decimal, non-empty texts and lists. Anything it accepts,
`schema.parse_analysis` accepts.

It is a function of the budget (`analysis_grammar`), so that the answer always closes within `max_tokens`:
- every free text is a lexeme with a token limit (llguidance's `max_tokens=` on a terminal); at the limit the
  grammar closes the string. A cut may fall after any token, so a text's characters are those whose every prefix
  is a complete JSON string: no backslash escapes (no straight double quote, no newline), which the canonical
  texts of the demo never need;
- every list has a most items, and the dimensions are at most the nine known ones;
- what the grammar fixes (keys, dimension names, punctuation) is written as the tokenizer writes it: the mask
  allows only the first token of the forced text's own tokenization, so its cost is measured with the tokenizer
  (`structure_tokens`) instead of guessed.
The texts share what the fixed structure leaves, by weight, above a minimum each (`TextBounds`). Extras the
canonical form may carry (case-study ids on dimensions, case studies) and lists longer than one item are in the
grammar only when the budget holds them; a budget too small for the smallest layout fails (`BudgetTooSmall`).
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mondrian_assets.core import schema

END_OF_TURN = "<|im_end|>"  # the chat template's end of the answer (tokenizer.json alone would pick <|endoftext|>)

MIN_TEXT_TOKENS = 6  # below this a comment says nothing
SCORE = r"/10(\.0)?|[1-9](\.[0-9])?/"
SCORE_TOKENS = 4  # "10.0" is four bytes: at worst four tokens, whatever the tokenizer
# first character not blank; then anything but a quote, a backslash or a control character (see the docstring)
_BODY = r'/[^"\\\x00-\x1f\x7f\s][^"\\\x00-\x1f\x7f]*/'
_CASE_STUDY_FIELDS = ("image_title", "year", "dimension", "explanation")
# how much of the room each kind of text gets, relative to a list item
_WEIGHTS = {"description": 4, "comment": 3, "recommendation": 3, "item": 1, "notes": 2, "reference": 1,
            "case_study": 1}  # fmt: skip


class GrammarError(RuntimeError):
    """The grammar could not be built for this tokenizer, or the matcher left it."""


class BudgetTooSmall(GrammarError):
    """`max_tokens` cannot hold even the smallest complete analysis."""


@dataclass(frozen=True)
class Layout:
    """What the grammar allows beyond the required fields."""

    list_items: int  # most items in key_strengths and priority_improvements
    extras: bool  # case_study_id / quote_id on dimensions, and up to MAX_CASE_STUDIES case studies


LAYOUTS = (Layout(3, True), Layout(3, False), Layout(1, False))  # most room first


@dataclass(frozen=True)
class TextBounds:
    """The grammar's limits for one budget: tokens per text of each kind, and the layout."""

    max_tokens: int
    layout: Layout
    tokens: dict[str, int]  # kind -> most tokens of one such text
    structure: int  # worst-case tokens of everything but the texts (end of turn included)


# --- the literals, shared by the grammar and its cost -----------------------------------------------------------
# Each literal after a text starts with that text's closing quote; each literal before one ends with its opening
# quote. The worst case takes every optional part, so its cost is the sum over the literals of that path.


def _head(name: str, first: bool) -> str:
    return ("" if first else ",") + '{"name":' + json.dumps(name) + ',"score":'


_DIM_TEXTS = (',"comment":"', '","recommendation":"')
_DIM_IDS = ('","case_study_id":"', '","quote_id":"')
_TOP = {
    "open": '{"image_description":"',
    "dimensions": '","dimensions":[',
    "overall": '],"overall_score":',
    "strengths": ',"key_strengths":["',
    "improvements": '"],"priority_improvements":["',
    "notes": '"],"technical_notes":"',
    "case_studies": '","case_studies":[',
    "close": '"}',
}
_NEXT_ITEM = '","'
_CASE_OPEN = '{"image_title":"'
_CASE_FIELDS = tuple(f'","{f}":"' for f in _CASE_STUDY_FIELDS[1:])
_CASE_CLOSE = '"}'


def _name_choices(name: str) -> int:
    """Places in a dimension's name where the model picks among names (each can cost a token of its own)."""
    names = schema.DIMENSION_NAMES
    return sum(len({n[i : i + 1] for n in names if n.startswith(name[:i])}) > 1 for i in range(len(name)))


@dataclass(frozen=True)
class _Path:
    literals: list[str]
    choices: int  # places where the model picks between literals: each may split the forced text once more
    texts: Counter[str]


def _worst_path(layout: Layout) -> _Path:
    """The literals, choice points and texts (by kind) of the longest answer `layout` allows."""
    literals = [_TOP["open"], _TOP["dimensions"]]
    choices = 0
    texts: Counter[str] = Counter(description=1, notes=1)
    for k, name in enumerate(schema.DIMENSION_NAMES):
        literals += [_head(name, k == 0), *_DIM_TEXTS, '"}']
        choices += 1 + _name_choices(name)  # another dimension or the end of the list, then which one
        texts.update(comment=1, recommendation=1)
        if layout.extras:
            literals += list(_DIM_IDS)
            choices += 2 * len(_DIM_IDS)  # an id or the end of the object, then which id
            texts.update(reference=len(_DIM_IDS))
    literals += [_TOP["overall"], _TOP["strengths"], _TOP["improvements"], _TOP["notes"]]
    literals += [_NEXT_ITEM] * (2 * (layout.list_items - 1))
    choices += 2 * layout.list_items  # another item or the end of the list
    texts.update(item=2 * layout.list_items)
    if layout.extras:
        literals += [_TOP["case_studies"]]
        for i in range(schema.MAX_CASE_STUDIES):
            literals += [("," if i else "") + _CASE_OPEN, *_CASE_FIELDS, _CASE_CLOSE]
            texts.update(case_study=len(_CASE_STUDY_FIELDS))
        choices += 1 + schema.MAX_CASE_STUDIES
        literals += ["]}"]
    else:
        literals += [_TOP["close"]]
    return _Path(literals, choices, texts)


def _structure(path: _Path, literal_tokens: Callable[[str], int]) -> int:
    """Worst-case tokens of everything but the texts, the end of turn included."""
    scores = SCORE_TOKENS * (len(schema.DIMENSION_NAMES) + 1)
    return sum(literal_tokens(s) for s in path.literals) + 2 * path.choices + scores + 1


def smallest_budget(literal_tokens: Callable[[str], int]) -> int:
    """The least `max_tokens` any layout fits in."""
    paths = [_worst_path(layout) for layout in LAYOUTS]
    return min(_structure(p, literal_tokens) + MIN_TEXT_TOKENS * sum(p.texts.values()) for p in paths)


def plan_bounds(max_tokens: int, literal_tokens: Callable[[str], int]) -> TextBounds:
    """The roomiest layout whose structure and minimum texts fit `max_tokens`, with the rest shared by weight."""
    for layout in LAYOUTS:
        path = _worst_path(layout)
        structure = _structure(path, literal_tokens)
        room = max_tokens - structure - MIN_TEXT_TOKENS * sum(path.texts.values())
        if room >= 0:
            total_weight = sum(_WEIGHTS[kind] * n for kind, n in path.texts.items())
            tokens = {kind: MIN_TEXT_TOKENS + room * _WEIGHTS[kind] // total_weight for kind in path.texts}
            return TextBounds(max_tokens, layout, tokens, structure)
    raise BudgetTooSmall(
        f"max_tokens={max_tokens} is too small for a complete analysis: the smallest layout needs "
        f"{smallest_budget(literal_tokens)} tokens for this tokenizer (its fixed structure plus {MIN_TEXT_TOKENS} "
        f"tokens per text)"
    )


# --- the grammar --------------------------------------------------------------------------------------------


def _lit(text: str) -> str:
    return json.dumps(text)


def _text_rules(bounds: TextBounds) -> list[str]:
    return [f"{kind}[max_tokens={n}]: BODY" for kind, n in sorted(bounds.tokens.items())]


def _dimension_rules(bounds: TextBounds) -> list[str]:
    n = len(schema.DIMENSION_NAMES)
    ids = " ".join(f"({_lit(s)} reference)?" for s in _DIM_IDS) if bounds.layout.extras else ""
    rules = []
    # first_k: a non-empty ordered pick from dimensions k..n-1; after_k: a possibly empty one, each after a comma
    for k, name in enumerate(schema.DIMENSION_NAMES):
        last = k + 1 == n
        body = f'SCORE {_lit(_DIM_TEXTS[0])} comment {_lit(_DIM_TEXTS[1])} recommendation {ids} "\\"}}"'
        rules.append(f"dim_{k}: {_lit(_head(name, True))} {body}")
        rules.append(f"first_{k}: dim_{k}" + ("" if last else f" after_{k + 1} | first_{k + 1}"))
        rules.append(f'after_{k}: ("," dim_{k})?' + ("" if last else f" after_{k + 1}"))
    return rules


def _case_study_rules(bounds: TextBounds) -> tuple[str, list[str]]:
    """The grammar's ending after technical_notes' text, and the rules it needs."""
    if not bounds.layout.extras:
        return _lit(_TOP["close"]), []
    fields = " ".join(f"{_lit(s)} case_study" for s in _CASE_FIELDS)
    case = f"case: {_lit(_CASE_OPEN)} case_study {fields} {_lit(_CASE_CLOSE)}"
    more = schema.MAX_CASE_STUDIES - 1
    ending = f'({_lit(_TOP["case_studies"])} case ("," case){{0,{more}}} "]}}" | {_lit(_TOP["close"])})'
    return ending, [case]


def _text_list(items: int) -> str:
    return "item" + (f" ({_lit(_NEXT_ITEM)} item){{0,{items - 1}}}" if items > 1 else "")


def analysis_grammar(bounds: TextBounds) -> str:
    """The canonical analysis as an llguidance Lark grammar, within `bounds`."""
    items = bounds.layout.list_items
    ending, case_rules = _case_study_rules(bounds)
    start = " ".join(
        [
            _lit(_TOP["open"]), "description", _lit(_TOP["dimensions"]), "first_0",
            _lit(_TOP["overall"]), "SCORE",
            _lit(_TOP["strengths"]), _text_list(items),
            _lit(_TOP["improvements"]), _text_list(items),
            _lit(_TOP["notes"]), "notes?", ending,
        ]
    )  # fmt: skip
    return "\n".join(
        [f"start: {start}", f"SCORE: {SCORE}", f"BODY: {_BODY}", *_text_rules(bounds), *_dimension_rules(bounds),
         *case_rules]  # fmt: skip
    )


# --- one tokenizer's view -----------------------------------------------------------------------------------


@functools.cache
def _ll_tokenizer(tokenizer_json: str, end_of_turn_id: int) -> Any:
    """llguidance's tokenizer, built once per tokenizer: for Qwen's 151k vocabulary it takes about a second."""
    import llguidance

    return llguidance.LLTokenizer(tokenizer_json, eos_token=end_of_turn_id)


def forced_steps(tokenizer: Any, forced: bytes) -> int:
    """Tokens the mask spends on `forced` bytes: each step writes the first token of what is left's tokenization."""
    steps = 0
    while forced:
        first = tokenizer.tokenize_bytes(forced)[0]
        forced = forced[len(tokenizer.decode_bytes([first])) :]
        steps += 1
    return steps


def structure_tokens(tokenizer: Any, literal: str) -> int:
    """The most tokens `literal` can cost under the mask: the token before it may end inside it, anywhere (then
    the rest is forced), or the whole literal is forced; a free choice among allowed tokens (a dimension's name,
    a comma or a closing bracket) costs more, counted per choice point by `plan_bounds`."""
    data = literal.encode()
    return 1 + max(forced_steps(tokenizer, data[k:]) for k in range(len(data)))


class AnalysisConstraint:
    """A tokenizer's compiled view of the analysis grammar; `processor(max_tokens)` gives a fresh per-request mask.
    Grammars are compiled once per budget."""

    def __init__(self, tokenizer_json: str, end_of_turn_id: int):
        self._tokenizer = _ll_tokenizer(tokenizer_json, end_of_turn_id)
        self.end_of_turn_id = end_of_turn_id
        self.bounds = functools.cache(self._bounds)
        self.grammar = functools.cache(self._grammar)
        self._literal_tokens = functools.cache(functools.partial(structure_tokens, self._tokenizer))

    @classmethod
    def for_processor(cls, processor: Any) -> AnalysisConstraint:
        tokenizer = getattr(processor, "tokenizer", processor)
        end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if not isinstance(end, int) or end < 0:
            raise GrammarError(f"the tokenizer has no {END_OF_TURN} token")
        backend = tokenizer.backend_tokenizer  # a fast tokenizer, as every Qwen3-VL ships
        return _constraint(backend.to_str(), end)

    def smallest_budget(self) -> int:
        return smallest_budget(self._literal_tokens)

    def _bounds(self, max_tokens: int) -> TextBounds:
        return plan_bounds(max_tokens, self._literal_tokens)

    def _grammar(self, max_tokens: int) -> Any:
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_lark(analysis_grammar(self.bounds(max_tokens)))
        problem = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if problem:
            raise GrammarError(f"the analysis grammar does not compile: {problem}")
        return grammar

    def matcher(self, max_tokens: int) -> Any:
        import llguidance

        return llguidance.LLMatcher(self._tokenizer, self.grammar(max_tokens))

    def processor(self, max_tokens: int) -> GrammarMask:
        return GrammarMask(self.matcher(max_tokens), self._tokenizer)

    def accepts(self, text: str, max_tokens: int) -> bool:
        """Whether `text` followed by the end of turn is a complete sentence of the grammar for `max_tokens`."""
        matcher = self.matcher(max_tokens)
        tokens = self._tokenizer.tokenize_str(text)
        return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.consume_token(self.end_of_turn_id)


@functools.cache
def _constraint(tokenizer_json: str, end_of_turn_id: int) -> AnalysisConstraint:
    """One per tokenizer, whoever asks (each worker, each evaluation): its grammars are compiled once per budget."""
    return AnalysisConstraint(tokenizer_json, end_of_turn_id)


class GrammarMask:
    """mlx-vlm logits processor for one generation: feeds each sampled token to the matcher, then keeps only the
    tokens the grammar allows next (the first call, right after prefill, has sampled nothing yet). Where the
    grammar forces text, only its tokenization's first token is allowed (so the structure costs what
    `structure_tokens` measured). Logits wider than the tokenizer's vocabulary (padded embeddings) are masked
    past its end. The grammar bounds the answer's length, so generation runs no loop guard under it.

    `corrections` counts the steps where the model's own greedy choice was not allowed: with greedy decoding,
    0 means the unconstrained answer would have been exactly this one (what the model learned, not the grammar).
    A later processor's choice among allowed tokens (the expected-value score rule's) is not the grammar's doing
    and is not counted.
    """

    def __init__(self, matcher: Any, tokenizer: Any):
        import llguidance.numpy

        self._matcher = matcher
        self._tokenizer = tokenizer
        self._fill = llguidance.numpy.fill_next_token_bitmask
        self._words = llguidance.numpy.allocate_token_bitmask(1, tokenizer.vocab_size)
        self._own_choice: mx.array | None = None
        self._own_allowed: mx.array | None = None  # whether the grammar allowed the model's own choice
        self.corrections = 0

    def settle(self, stop_ids: Collection[int]) -> None:
        """Count the last step too: generation stops on an end token without calling the processor again, and
        the model stopping on any of its end tokens is the same answer."""
        if self._own_choice is not None:
            self.corrections += int(self._own_choice.item()) not in stop_ids and not bool(self._own_allowed.item())
            self._own_choice = self._own_allowed = None

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise GrammarError(f"the grammar rejected a sampled token: {self._matcher.get_error()}")

    def allowed(self) -> np.ndarray:
        """The tokens allowed next, as a boolean row over the tokenizer's vocabulary."""
        vocab = self._tokenizer.vocab_size
        forced = self._matcher.compute_ff_bytes()
        if forced:
            only = np.zeros(vocab, dtype=bool)
            only[self._tokenizer.tokenize_bytes(forced)[0]] = True
            return only
        self._fill(self._matcher, self._words)
        return np.unpackbits(self._words.view(np.uint8), bitorder="little")[:vocab].astype(bool)

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        if self._own_choice is not None:
            self.corrections += not bool(self._own_allowed.item())
            self.consume(int(history[-1].item()))
        allowed = mx.array(self.allowed())[None]
        width = logits.shape[-1]
        if allowed.shape[-1] >= width:
            allowed = allowed[:, :width]
        else:
            allowed = mx.concatenate([allowed, mx.zeros((1, width - allowed.shape[-1]), dtype=mx.bool_)], axis=-1)
        self._own_choice = mx.argmax(logits, axis=-1)
        self._own_allowed = allowed[0, self._own_choice[0]]
        return mx.where(allowed, logits, mx.array(-np.inf, dtype=logits.dtype))
