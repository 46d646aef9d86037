"""What users get from a fine-tuned model under serving's grammar mask, beside what it learned on its own.

Greedy decoding under the mask gives exactly the unconstrained answer whenever the grammar accepts that answer as
it stands (every greedy token was allowed, so the mask changed no choice); only the other examples are decoded
again with the mask. The mask's cost is timed like the inference overhead (`overhead.py`): the same prompts with
and without it, interleaved and repeated, every run decoding the same number of tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mondrian_assets.core import schema
from mondrian_assets.core.evaluation.overhead import OverheadMeasurement, interleaved_timings, timed_run
from mondrian_assets.core.inference.records import EvalExample, Generation

if TYPE_CHECKING:  # the record stays importable without MLX (metrics and the report are pure)
    from mondrian_assets.core.inference.loading import LoadedModel


@dataclass(frozen=True)
class ConstrainedCompliance:
    """Counts over the same validation examples; `timing`'s overhead is the mask's cost in decode time."""

    examples: int
    valid_unconstrained: int
    accepted_as_is: int  # unconstrained answers the grammar accepts unchanged (constrained greedy = the same text)
    redecoded: int
    valid_constrained: int
    cut_off: int  # constrained answers that did not reach the grammar's end (its bounds make this 0)
    timing: OverheadMeasurement | None
    score_values_by_rule: int = 0  # written by the expected-value rule in the re-decoded answers

    @property
    def decode_speed_ratio(self) -> float | None:
        """Constrained decode tokens/s over unconstrained, on the same prompts and token count."""
        return 1.0 / (1.0 + self.timing.overhead) if self.timing is not None else None

    def as_dict(self) -> dict:
        n = self.examples
        return {
            "examples": n,
            "format_compliance_unconstrained": self.valid_unconstrained / n if n else None,
            "format_compliance_constrained": self.valid_constrained / n if n else None,
            "valid_unconstrained": self.valid_unconstrained,
            "valid_constrained": self.valid_constrained,
            "accepted_as_is": self.accepted_as_is,
            "redecoded": self.redecoded,
            "cut_off": self.cut_off,
            "score_values_by_rule_redecoded": self.score_values_by_rule,
            "decode_speed_ratio": self.decode_speed_ratio,
            "timing_noise": self.timing.noise if self.timing is not None else None,
            "timed_pairs": self.timing.pairs if self.timing is not None else 0,
        }


def _valid(text: str) -> bool:
    return schema.parse_analysis(text).ok


def constrained_compliance(
    loaded: LoadedModel,
    examples: Sequence[EvalExample],
    generations: Sequence[Generation],
    *,
    max_tokens: int,
    seed: int,
    expected_scores: bool,
    timing_prompts: int,
    repeats: int,
    tokens: int,
    log: Callable[[str], None] = print,
) -> ConstrainedCompliance:
    """Compliance of `loaded` (whose unconstrained greedy `generations` these are) under the analysis grammar."""
    from mondrian_assets.core.inference.constrained import AnalysisConstraint
    from mondrian_assets.core.inference.generate import generate_one

    constraint = AnalysisConstraint.for_processor(loaded.processor)
    # the grammar's worst case (nine dimensions, every list full) may need more than the references do
    max_tokens = max(max_tokens, constraint.smallest_budget())
    accepted = [constraint.accepts(g.text, max_tokens) for g in generations]
    redo = [e for e, ok in zip(examples, accepted, strict=True) if not ok]
    log(f"under the grammar mask: {sum(accepted)}/{len(examples)} answers stand as they are, "
        f"decoding {len(redo)} again with the mask")  # fmt: skip
    redone = [
        generate_one(loaded, e.image_path, e.prompt, max_tokens=max_tokens, seed=seed,
                     logits_processors=[constraint.processor(max_tokens)], expected_scores=expected_scores)  # fmt: skip
        for e in redo
    ]
    timed = list(examples[:timing_prompts])
    timed_run(loaded, timed[0], min(tokens, 4), [constraint.processor(max_tokens)])  # warm-up: the mask's first use
    timing = interleaved_timings(
        lambda e: timed_run(loaded, e, tokens),
        lambda e: timed_run(loaded, e, tokens, [constraint.processor(max_tokens)]),
        timed, repeats=repeats, tokens=tokens,
    )  # fmt: skip
    return ConstrainedCompliance(
        examples=len(examples),
        valid_unconstrained=sum(_valid(g.text) for g in generations),
        accepted_as_is=sum(accepted),
        redecoded=len(redone),
        valid_constrained=sum(_valid(g.text) for g, ok in zip(generations, accepted) if ok)
        + sum(_valid(g.text) for g in redone),
        cut_off=sum(g.finish_reason != "stop" for g in redone),
        timing=timing,
        score_values_by_rule=sum(g.score_values_by_rule for g in redone),
    )
