"""Checks of one advisor's split as written on disk: they read the files training will read, never the values the
writer held in memory, so a bad write, a later edit or a half-copied folder is caught."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mondrian_assets.core.data.splits import SplitFiles
from mondrian_assets.core.schema import canonical_json, parse_analysis

MIN_TEXT_CHARS = 100  # the plan's bar for a non-trivial prompt and response


@dataclass(frozen=True)
class SplitCheck:
    name: str
    passed: bool
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Row:
    image: str
    prompt: str
    response: str


def _jsonl_rows(path: Path) -> list[_Row]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        user, assistant = record["messages"][0], record["messages"][1]
        rows.append(_Row(record["images"][0], user["content"][-1]["text"], assistant["content"][0]["text"]))
    return rows


def _json_rows(path: Path) -> list[_Row]:
    return [_Row(r["image_path"], r["prompt"], r["response"]) for r in json.loads(path.read_text(encoding="utf-8"))]


def _content_hash(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _decode_error(path: str) -> str | None:
    try:
        with Image.open(path) as img:
            img.load()
    except OSError as exc:
        return f"{path}: {exc}"
    return None


def _round_trips(response: str) -> bool:
    parsed = parse_analysis(response)
    return parsed.analysis is not None and canonical_json(parsed.analysis) == response


def check_written_split(
    files: SplitFiles, *, val_fraction: float, ratio_tolerance: float, min_text_chars: int = MIN_TEXT_CHARS
) -> list[SplitCheck]:
    """Every check, in a fixed order; a file that cannot be read fails `files_agree` (and the rest see no rows)."""
    try:
        train, val = _jsonl_rows(files.train_jsonl), _jsonl_rows(files.val_jsonl)
        seeds = {"train": _json_rows(files.train_json), "val": _json_rows(files.val_json)}
        meta = json.loads(files.meta_json.read_text(encoding="utf-8"))
        unreadable = ""
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        train, val, seeds, meta = [], [], {"train": [], "val": []}, {}
        unreadable = f"{type(exc).__name__}: {exc}"
    everything = train + val
    counts = meta.get("counts", {})
    agree = not unreadable and seeds["train"] == train and seeds["val"] == val and (
        counts.get("train"), counts.get("val")) == (len(train), len(val))  # fmt: skip
    checks = [SplitCheck("files_agree", agree, {
        "train_rows": len(train), "val_rows": len(val),
        "problem": unreadable or ("ok" if agree else "the JSON, JSONL and meta files describe different examples"),
    })]  # fmt: skip

    # the same picture is the same prepared file: hash the bytes training will load
    shared = ({_content_hash(r.image) for r in train} & {_content_hash(r.image) for r in val}) - {None}
    checks.append(SplitCheck("no_image_on_both_sides", not shared, {"shared_images": len(shared)}))

    failures = [error for r in everything if (error := _decode_error(r.image))]
    checks.append(SplitCheck("images_decode", not failures, {
        "checked": len(everything), "failed": len(failures), "first_failure": failures[0] if failures else "none"}))  # fmt: skip

    short = sum(1 for r in everything if len(r.prompt) <= min_text_chars or len(r.response) <= min_text_chars)
    checks.append(SplitCheck("texts_non_trivial", short == 0 and bool(everything),
                             {"too_short": short, "examples": len(everything), "minimum_chars": min_text_chars}))

    broken = sum(not _round_trips(r.response) for r in everything)
    checks.append(SplitCheck("responses_round_trip", broken == 0, {"not_round_tripping": broken}))

    share = len(val) / len(everything) if everything else 0.0
    within = not val or abs(share - val_fraction) <= ratio_tolerance
    checks.append(SplitCheck("split_ratio", within, {
        "val_share": round(share, 3), "wanted": val_fraction, "note": meta.get("note") or "ok"}))  # fmt: skip
    return checks
