"""Per-advisor train/val splits that never leak an image across sides and never move an example between sides.

An example's side is a pure function of its image's content hash, so the same picture analysed twice lands on
one side, and new jobs cannot move old examples: validation sets stay comparable from one retrain to the next.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mondrian_assets.core import atomic
from mondrian_assets.core.data.images import APP_MAX_SIDE, prepared_image
from mondrian_assets.core.schema import chat_messages

MIN_EXAMPLES_FOR_VAL = 5


@dataclass(frozen=True)
class SplitConfig:
    val_fraction: float = 0.2
    min_examples_for_val: int = MIN_EXAMPLES_FOR_VAL
    max_image_side: int = APP_MAX_SIDE

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")


@dataclass(frozen=True)
class Example:
    job_id: str
    image_sha256: str
    image_path: str  # the prepared (upright, <= 800 px) copy
    source_image_path: str
    prompt: str
    response: str
    overall_score: float

    def seed_row(self) -> dict:
        """The plan's `{image_path, prompt, response}` row (plus the job it came from)."""
        return {"image_path": self.image_path, "prompt": self.prompt, "response": self.response, "job_id": self.job_id}

    def mlx_row(self) -> dict:
        """The `{"images", "messages"}` row mlx-vlm's trainer reads."""
        return {"images": [self.image_path], "messages": chat_messages(self.prompt, self.response)}


@dataclass(frozen=True)
class AdvisorSplit:
    advisor: str
    train: list[Example]
    val: list[Example]
    data_version: str
    note: str  # why val is empty, when it is

    @property
    def has_val(self) -> bool:
        return bool(self.val)


def side_of(image_sha256: str, val_fraction: float) -> str:
    bucket = int(hashlib.sha256(f"split:{image_sha256}".encode()).hexdigest()[:12], 16) / float(16**12)
    return "val" if bucket < val_fraction else "train"


def data_version(train: list[Example], val: list[Example], config: SplitConfig) -> str:
    h = hashlib.sha256(json.dumps({"val_fraction": config.val_fraction, "max_side": config.max_image_side}).encode())
    for side, examples in (("train", train), ("val", val)):
        for e in sorted(examples, key=lambda e: e.image_sha256):
            h.update(f"{side}\0{e.image_sha256}\0{e.prompt}\0{e.response}\n".encode())
    return h.hexdigest()[:16]


def split_advisor(
    advisor: str, records: pd.DataFrame, prompt: str, config: SplitConfig, image_cache: Path
) -> AdvisorSplit:
    """Assign each linked record of one advisor to a side and prepare its image as serving will see it."""
    rows = records[records["advisor"] == advisor].sort_values("image_sha256")
    examples = [
        Example(
            job_id=r.job_id,
            image_sha256=r.image_sha256,
            image_path=str(prepared_image(Path(r.image_path), r.image_sha256, image_cache, config.max_image_side)),
            source_image_path=r.image_path,
            prompt=prompt,
            response=r.analysis_json,
            overall_score=float(r.overall_score),
        )
        for r in rows.itertuples()
    ]
    if len(examples) < config.min_examples_for_val:
        note = f"only {len(examples)} examples (< {config.min_examples_for_val}): no validation set"
        return AdvisorSplit(advisor, examples, [], data_version(examples, [], config), note)
    train = [e for e in examples if side_of(e.image_sha256, config.val_fraction) == "train"]
    val = [e for e in examples if side_of(e.image_sha256, config.val_fraction) == "val"]
    note = "" if val else f"no image of {len(examples)} hashed into the {config.val_fraction:.0%} validation share"
    return AdvisorSplit(advisor, train, val, data_version(train, val, config), note)


def _distribution(examples: list[Example]) -> dict:
    scores = [e.overall_score for e in examples]
    if not scores:
        return {"count": 0}
    return {
        "count": len(scores),
        "mean": round(statistics.fmean(scores), 3),
        "stdev": round(statistics.pstdev(scores), 3),
        "min": min(scores),
        "max": max(scores),
    }


def _length_stats(texts: list[str]) -> dict:
    if not texts:
        return {"count": 0}
    lengths = sorted(len(t) for t in texts)
    return {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]}


@dataclass(frozen=True)
class SplitFiles:
    directory: Path
    train_json: Path
    val_json: Path
    meta_json: Path
    train_jsonl: Path
    val_jsonl: Path


def split_files(training_data: Path, advisor: str) -> SplitFiles:
    d = training_data / advisor
    return SplitFiles(
        directory=d,
        train_json=d / f"training_data_{advisor}_train.json",
        val_json=d / f"training_data_{advisor}_val.json",
        meta_json=d / f"training_data_{advisor}_meta.json",
        train_jsonl=d / "train.jsonl",
        val_jsonl=d / "valid.jsonl",
    )


def token_length_stats(texts: list[str], tokenizer_json: Path | None) -> dict:
    """Token counts under the tokenizer training will use (prompt text only: image tokens come on top)."""
    if tokenizer_json is None or not tokenizer_json.is_file() or not texts:
        return {"note": "no local tokenizer.json for the base model"}
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    lengths = sorted(len(encoding.ids) for encoding in tokenizer.encode_batch(texts))
    return {"tokenizer": str(tokenizer_json), "min": lengths[0], "median": lengths[len(lengths) // 2],
            "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))], "max": lengths[-1]}  # fmt: skip


def split_meta(split: AdvisorSplit, config: SplitConfig, tokenizer_json: Path | None = None) -> dict:
    everything = split.train + split.val
    return {
        "advisor": split.advisor,
        "data_version": split.data_version,
        "val_fraction": config.val_fraction,
        "counts": {"train": len(split.train), "val": len(split.val), "total": len(everything)},
        "note": split.note,
        "score_distribution": {"train": _distribution(split.train), "val": _distribution(split.val)},
        "chars": {
            "prompt": _length_stats([e.prompt for e in everything]),
            "response": _length_stats([e.response for e in everything]),
        },
        "tokens": {
            "prompt": token_length_stats([e.prompt for e in everything[:1]], tokenizer_json),
            "response": token_length_stats([e.response for e in everything], tokenizer_json),
        },
        "sides": {e.image_sha256: "train" for e in split.train} | {e.image_sha256: "val" for e in split.val},
    }


def write_split(split: AdvisorSplit, config: SplitConfig, training_data: Path, tokenizer_json: Path | None = None) -> SplitFiles:
    files = split_files(training_data, split.advisor)
    atomic.write_json(files.train_json, [e.seed_row() for e in split.train])
    atomic.write_json(files.val_json, [e.seed_row() for e in split.val])
    atomic.write_jsonl(files.train_jsonl, [e.mlx_row() for e in split.train])
    atomic.write_jsonl(files.val_jsonl, [e.mlx_row() for e in split.val])
    # meta last: its data_version vouches for the files written before it
    atomic.write_json(files.meta_json, split_meta(split, config, tokenizer_json))
    return files
