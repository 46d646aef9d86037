"""Training data: JSONL rows tokenized exactly as generation sees them, answer tokens marked, batches drawn from
the seed.

Data: JSONL, one example per line, `{"images": ["/abs/path.jpg"], "messages": schema.chat_messages(prompt,
response)}`. Put the splits in one folder as `train.jsonl` and `valid.jsonl` and the same files feed
`python -m mlx_vlm.train --data <folder> --train-on-completions` (its completion mask also counts the template's
newline after `<|im_end|>`, which ours leaves out: one token an example).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mondrian_assets.core.training.config import TrainConfig, TrainingConfigError


@dataclass(frozen=True)
class Example:
    """One tokenized conversation: `loss_mask[i]` is 1 where token i is a training target."""

    input_ids: np.ndarray  # (L,) int32
    loss_mask: np.ndarray  # (L,) int32
    pixel_values: np.ndarray | None  # (patches, C * t * p * p) float32
    image_grid_thw: np.ndarray | None  # (images, 3) int64
    source: str = ""

    @property
    def num_answer_tokens(self) -> int:
        return int(self.loss_mask.sum())


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TrainingConfigError(f"{path}:{number} is not valid JSON: {exc}") from exc
    return rows


def prepare_examples(processor: Any, model_config: dict, path: Path, config: TrainConfig) -> list[Example]:
    if not path.is_file():
        raise TrainingConfigError(f"data file {path} does not exist")
    return [
        encode_example(processor, model_config, _resolve_images(row, path.parent), config, where=f"{path}:{i}")
        for i, row in enumerate(read_jsonl(path), 1)
    ]


def _resolve_images(row: object, folder: Path) -> object:
    """Relative image paths are relative to the JSONL file's folder (as mlx_vlm.train reads them)."""
    if isinstance(row, dict) and isinstance(row.get("images"), list):
        images = [str(folder / i) if isinstance(i, str) and not Path(i).is_absolute() else i for i in row["images"]]
        return {**row, "images": images}
    return row


def encode_example(
    processor: Any, model_config: dict, row: object, config: TrainConfig, *, where: str = "example"
) -> Example:
    """Tokenize one row exactly as generation will see it, and mark the answer tokens.

    The prompt (everything up to the assistant's turn, with the generation prompt) is encoded on its own; it must
    be a token prefix of the full conversation, and the tokens after it are the answer.
    """
    from mlx_vlm.prompt_utils import apply_chat_template

    messages, images = _check_row(row, where)
    full_text = apply_chat_template(
        processor, model_config, messages, add_generation_prompt=False, num_images=len(images)
    )
    prompt_text = apply_chat_template(
        processor, model_config, messages[:-1], add_generation_prompt=True, num_images=len(images)
    )
    full = _model_inputs(processor, model_config, full_text, images, where)
    prompt = _model_inputs(processor, model_config, prompt_text, images, where)
    ids = np.asarray(full["input_ids"]).reshape(-1).astype(np.int32)
    prompt_ids = np.asarray(prompt["input_ids"]).reshape(-1)
    if len(prompt_ids) >= len(ids) or not np.array_equal(ids[: len(prompt_ids)], prompt_ids):
        raise TrainingConfigError(
            f"{where}: the prompt does not tokenize as a prefix of the conversation, so the answer cannot be "
            "located (chat template or tokenizer not prefix-stable)"
        )

    grid = None if full.get("image_grid_thw") is None else np.asarray(full["image_grid_thw"]).reshape(-1, 3)
    image_token = model_config.get("image_token_id")
    n_image_tokens = int((ids == image_token).sum())
    if images:
        merge = model_config.get("vision_config", {}).get("spatial_merge_size", 2)
        expected = 0 if grid is None else int(sum(int(np.prod(g)) // merge**2 for g in grid))
        if n_image_tokens != expected:
            raise TrainingConfigError(
                f"{where}: {n_image_tokens} image tokens in the text but {expected} image features "
                "(tokenizer does not keep <|image_pad|> as one token?)"
            )
    if len(ids) > config.max_seq_length:
        last_image = int(np.flatnonzero(ids == image_token).max()) if n_image_tokens else -1
        cut = "it would cut image tokens" if last_image >= config.max_seq_length else "it would cut the answer"
        raise TrainingConfigError(
            f"{where}: {len(ids)} tokens exceed max_seq_length={config.max_seq_length} ({cut}); "
            "raise max_seq_length or shorten the example"
        )

    # Targets: the answer through its end-of-turn token (what generation must produce before it stops), not the
    # template's trailing newline; with answer_only_loss off, the prompt's text tokens too.
    end = len(ids)
    stops = np.flatnonzero(np.isin(ids[len(prompt_ids) :], _stop_ids(processor, model_config)))
    if stops.size:
        end = len(prompt_ids) + int(stops[0]) + 1
    mask = np.zeros(len(ids), np.int32)
    mask[len(prompt_ids) if config.answer_only_loss else 1 : end] = 1
    mask[ids == image_token] = 0  # image placeholders are inputs, never targets
    pixels = full.get("pixel_values")
    return Example(
        input_ids=ids,
        loss_mask=mask,
        pixel_values=None if pixels is None else np.asarray(pixels, dtype=np.float32),
        image_grid_thw=grid,
        source=where,
    )


def _stop_ids(processor: Any, model_config: dict) -> list[int]:
    eos = model_config.get("eos_token_id")
    ids = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
    tokenizer_eos = getattr(getattr(processor, "tokenizer", processor), "eos_token_id", None)
    return [int(i) for i in ids + ([tokenizer_eos] if tokenizer_eos is not None else [])]


def _check_row(row: object, where: str) -> tuple[list[dict], list[str]]:
    if not isinstance(row, dict):
        raise TrainingConfigError(f"{where}: a row must be a JSON object")
    messages = row.get("messages")
    images = row.get("images", [])
    if not isinstance(messages, list) or len(messages) < 2:
        raise TrainingConfigError(f"{where}: 'messages' must hold a user turn and an assistant turn")
    if not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise TrainingConfigError(f"{where}: the last message must be the assistant's answer")
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise TrainingConfigError(f"{where}: 'images' must be a list of file paths")
    image_parts = sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if isinstance(part, dict) and part.get("type") in ("image", "image_url", "input_image")
    )
    if image_parts != len(images):
        raise TrainingConfigError(
            f"{where}: {len(images)} image file(s) but {image_parts} image part(s) in the messages"
        )
    for image in images:
        if not Path(image).is_file():
            raise TrainingConfigError(f"{where}: image {image} does not exist")
    return messages, images


def _model_inputs(processor: Any, model_config: dict, text: str, images: list[str], where: str) -> dict:
    from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

    try:
        return prepare_inputs(
            processor,
            images=images or None,
            prompts=text,
            image_token_index=model_config.get("image_token_id"),
            add_special_tokens=should_add_special_tokens(model_config["model_type"], processor),
        )
    except Exception as exc:
        raise TrainingConfigError(f"{where}: the processor rejected the example: {exc}") from exc


def collate(examples: list[Example], pad_id: int, length_multiple: int = 1, align_input: bool = False) -> dict:
    """Right-pad a batch; padding is neither attended to by real tokens (causal) nor a target.

    With `length_multiple` > 1 the length is rounded up to a multiple of it, and so is the number of target
    rows (padded with position 0 at weight 0): a GPU builds its kernels per shape, so a few shapes beat many.
    `align_input` rounds the model's input instead (the ids less the last, what the loop feeds the model), so
    the padded ids are one longer than a multiple.
    `target_positions` are the flat positions in the (batch, length - 1) inputs whose next token is a target;
    `targets` counts them as a host int, so weighting a micro-batch never waits on the device.
    """
    import mlx.core as mx

    longest = max(len(e.input_ids) for e in examples)
    length = _round_up(longest - 1, length_multiple) + 1 if align_input else _round_up(longest, length_multiple)
    ids = np.full((len(examples), length), pad_id, np.int32)
    mask = np.zeros((len(examples), length), np.int32)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = e.input_ids
        mask[row, : len(e.loss_mask)] = e.loss_mask
    positions = np.flatnonzero(mask[:, 1:])
    rows = max(_round_up(len(positions), length_multiple), 1)
    weights = np.zeros(rows, np.float32)
    weights[: len(positions)] = 1.0
    batch = {
        "input_ids": mx.array(ids),
        "target_positions": mx.array(np.pad(positions, (0, rows - len(positions))).astype(np.int32)),
        "target_weights": mx.array(weights),
        "targets": len(positions),
        "pixel_values": None,
        "image_grid_thw": None,
    }
    with_images = [e for e in examples if e.pixel_values is not None]
    if with_images:
        batch["pixel_values"] = mx.array(np.concatenate([e.pixel_values for e in with_images]))
        batch["image_grid_thw"] = mx.array(np.concatenate([e.image_grid_thw for e in with_images]))
    return batch


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def micro_batch(n_examples: int, batch_size: int, seed: int, index: int) -> list[int]:
    """The example indices of micro-batch `index` in the endless, seeded stream of epochs.

    Each epoch is a fresh permutation drawn from (seed, epoch), so any position in the stream can be recomputed
    after a restart without replaying the ones before it.
    """
    per_epoch = math.ceil(n_examples / batch_size)
    epoch, slot = divmod(index, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return [int(i) for i in order[slot * batch_size : (slot + 1) * batch_size]]
