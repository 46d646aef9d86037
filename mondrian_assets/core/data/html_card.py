"""Recover the older app's HTML analysis cards into the canonical schema.

Before the app stored JSON it stored a rendered card: per dimension a heading with the name and a score written
`7.0/10 (Good)`, a comment and a "How to Improve:" recommendation, then "Overall Grade 7.5/10", sometimes an
"Image Analysis" description, a "Grade Note" and reference-image blocks. The markup is read with the standard
library's HTML parser; only the plain-text blocks it yields are matched against the card's labels.

Fields a card does not carry are derived by one rule, the way the app's JSON era filled them:
- `key_strengths`: the names of the two top-scored dimensions (ties: card order);
- `priority_improvements`: the names of the two lowest-scored dimensions (ties: card order);
- `technical_notes`: the card's "Grade Note", else empty;
- `image_description`: the card's "Image Analysis" text, else its first dimension's comment (the cards open with
  Composition, which says what is in the frame).
A card with a dimension lacking its score, comment or recommendation, or the overall grade, is not recovered
(`html_card_incomplete`); a card with no score at all is the app's error card (`html_error_card`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

from mondrian_assets.core.schema import ParseResult, validate_analysis

# Tags whose start or end separates text blocks; everything else (strong, span, em, a, ...) runs inline.
_BLOCK_TAGS = frozenset(
    "address article aside blockquote br dd div dl dt figcaption figure footer h1 h2 h3 h4 h5 h6 header hr li "
    "main nav ol p section table tbody td th thead tr ul".split()
)
_HIDDEN_TAGS = frozenset({"script", "style", "head", "title", "template"})
_SCORE = re.compile(r"(?<![\d.])(\d{1,2}(?:\.\d+)?)\s*/\s*10(?![\d.])")
_RATING_WORD = re.compile(r"^\(\s*[A-Za-z ]{1,20}\)\s*")  # the "(Good)" after a score
# A bare "Overall" counts only before a colon or a score, so a comment that opens with the word stays a comment.
_LABEL = re.compile(
    r"^(how to improve|overall(?: grade| score)?(?=\s*(?::|\d|$))|grade note|image analysis)\b\s*:?\s*", re.IGNORECASE
)
_TOP_DIMENSIONS = 2  # names the JSON era lists as strengths, and as improvements
NOT_HTML = "not_html"  # the error code of text that is no card at all
_MAX_HEADING_CHARS = 60


class _TextBlocks(HTMLParser):
    """The card's visible text, split at block elements, whitespace collapsed."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self._parts: list[str] = []
        self._hidden = 0

    def _flush(self) -> None:
        text = " ".join("".join(self._parts).split())
        if text:
            self.blocks.append(text)
        self._parts = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in _HIDDEN_TAGS:
            self._hidden += 1
        elif tag in _BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN_TAGS:
            self._hidden = max(0, self._hidden - 1)
        elif tag in _BLOCK_TAGS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self._parts.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def text_blocks(markup: str) -> list[str]:
    parser = _TextBlocks()
    parser.feed(markup)
    parser.close()
    return parser.blocks


@dataclass
class CardDimension:
    name: str
    score: float
    comment: list[str] = field(default_factory=list)
    recommendation: str = ""


@dataclass
class Card:
    """What a card states, before the missing fields are derived."""

    dimensions: list[CardDimension] = field(default_factory=list)
    overall: float | None = None
    description: str = ""
    grade_note: str = ""
    unscored: list[str] = field(default_factory=list)  # headings of dimensions shown without a score
    text: str = ""  # all of its visible text, for reporting a card that cannot be read


def looks_like_html(text: str) -> bool:
    return text.lstrip().startswith("<")


def _split_score(text: str) -> tuple[float | None, str, str]:
    """(the first `x/10` in the text, what precedes it, what follows it minus a rating word)."""
    match = _SCORE.search(text)
    if match is None:
        return None, text, ""
    after = _RATING_WORD.sub("", text[match.end() :].strip())
    return float(match.group(1)), text[: match.start()].strip(" :-–—|"), after.strip(" :-–—|")


class _CardReader:
    """Walks a card's text blocks in order: a label sets its field (inline, or from the next block), a score opens
    a dimension named by the text before it or by the heading just above it, and other text is the open
    dimension's comment until its "How to Improve"."""

    def __init__(self, blocks: list[str]) -> None:
        self.card = Card(text=" ".join(blocks))
        self.current: CardDimension | None = None
        self.awaiting: str | None = None  # a label whose value is the next block
        self.heading: str | None = None  # a short block that may name the dimension whose score comes next
        for block in blocks:
            self._read(block)

    def _read(self, block: str) -> None:
        if self.awaiting is not None:
            label, self.awaiting = self.awaiting, None
            self._set(label, block)
            return
        label_match = _LABEL.match(block)
        if label_match is not None:
            label = label_match.group(1).lower()
            label = "overall grade" if label.startswith("overall") else label
            value = block[label_match.end() :]
            if value:
                self._set(label, value)
            else:
                self.awaiting = label
            return
        score, before, after = _split_score(block)
        name = before if before and len(before) <= _MAX_HEADING_CHARS else self.heading
        if score is not None and name and self.card.overall is None:
            self.current = CardDimension(name, score, [after] if after else [])
            self.card.dimensions.append(self.current)
            self.heading = None
        elif self.current is not None and not self.current.recommendation:
            self.current.comment.append(block)
        elif len(block) <= _MAX_HEADING_CHARS:
            self.heading = block

    def _set(self, label: str, value: str) -> None:
        card = self.card
        if label == "overall grade":
            card.overall = _split_score(value)[0]
            self.current = None  # what follows the grade (notes, reference images) is no dimension's comment
        elif label == "how to improve":
            if self.current is None or self.current.recommendation:
                card.unscored.append(self.heading or value)  # advice for a dimension that showed no score
            else:
                self.current.recommendation = value
        elif label == "grade note":
            card.grade_note = value
        elif label == "image analysis":
            card.description = value
        self.heading = None


def read_card(markup: str) -> Card:
    return _CardReader(text_blocks(markup)).card


def _ranked_names(dimensions: list[CardDimension], *, highest: bool) -> list[str]:
    """The top (or bottom) dimension names; with fewer than four dimensions one each, so the lists never overlap."""
    count = max(1, min(_TOP_DIMENSIONS, len(dimensions) // 2))
    order = sorted(range(len(dimensions)), key=lambda i: (-dimensions[i].score if highest else dimensions[i].score, i))
    return [dimensions[i].name for i in order[:count]]


@dataclass(frozen=True)
class CardRecovery:
    result: ParseResult
    derived_fields: tuple[str, ...] = ()


def recover_card(markup: str) -> CardRecovery:
    """An HTML card -> the canonical analysis (validated like any other), or a coded reason why not."""
    if not looks_like_html(markup):
        return CardRecovery(ParseResult(None, NOT_HTML, "the text is not HTML"))
    card = read_card(markup)
    if not card.dimensions and card.overall is None:
        return CardRecovery(ParseResult(None, "html_error_card", card.text[:200] or "no text"))
    problems = [f"no score for {name!r}" for name in card.unscored]
    problems += [f"{d.name}: no comment" for d in card.dimensions if not d.comment]
    problems += [f"{d.name}: no How to Improve" for d in card.dimensions if not d.recommendation]
    if not card.dimensions:
        problems.append("no dimension scores")
    if card.overall is None:
        problems.append("no Overall Grade")
    if problems:
        return CardRecovery(ParseResult(None, "html_card_incomplete", "; ".join(problems)))
    derived = ["key_strengths", "priority_improvements"]
    if not card.grade_note:
        derived.append("technical_notes")
    if not card.description:
        derived.append("image_description")
    data = {
        "image_description": card.description or " ".join(card.dimensions[0].comment),
        "dimensions": [
            {"name": d.name, "score": d.score, "comment": " ".join(d.comment), "recommendation": d.recommendation}
            for d in card.dimensions
        ],
        "overall_score": card.overall,
        "key_strengths": _ranked_names(card.dimensions, highest=True),
        "priority_improvements": _ranked_names(card.dimensions, highest=False),
        "technical_notes": card.grade_note,
    }
    return CardRecovery(validate_analysis(data), tuple(derived))
