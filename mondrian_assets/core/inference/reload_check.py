"""The adapter reload check: `mlx_vlm.load(base, adapter_path=...)` and one generation, run in a child process."""

from __future__ import annotations

from pathlib import Path

from mondrian_assets.core.isolation import run_in_child


def generate_one(base_model: str, adapter_dir: Path, val_json: Path, max_tokens: int) -> str:
    """Load the adapter onto its base and answer the first validation example (MLX runs here)."""
    from mondrian_assets.core.inference.generate import generate_analyses, load_eval_examples
    from mondrian_assets.core.inference.loading import load_for_inference

    loaded = load_for_inference(base_model, adapter_dir)
    return generate_analyses(loaded, load_eval_examples(val_json, limit=1), max_tokens=max_tokens)[0].text


def reload_and_generate(base_model: str, adapter_dir: Path, val_json: Path, max_tokens: int) -> tuple[bool, str]:
    """(passed, detail): whether the adapter reloads and generates non-empty text, with the text or what failed.
    Any failure, a crash of MLX included, is the check's result, never the caller's crash."""
    try:
        text = run_in_child(generate_one, {"base_model": base_model, "adapter_dir": adapter_dir,
                                           "val_json": val_json, "max_tokens": max_tokens}, what="reload check")  # fmt: skip
    except Exception as exc:
        return False, str(exc)[:2000]
    return bool(text.strip()), text[:200]
