"""What several test modules build the same way: analyses with known scores, images, Dagster runs of one advisor.
(Recording the files and connections code opens is `guards.py`'s.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
from PIL import Image

from mondrian_assets.core import schema
from mondrian_assets.defs import evaluation, linking, splits, training

ASSETS = [linking.linked_records, splits.advisor_splits, training.lora_adapter, evaluation.eval_report]


def analysis_dict(overall: float = 7.0, dims: dict[str, float] | None = None, **fields: object) -> dict:
    """A valid analysis; `dims` maps dimension names to scores (default: the first seven, each at `overall`)."""
    dims = dims if dims is not None else {name: overall for name in schema.DIMENSION_NAMES[:7]}
    data = {
        "image_description": "A barn under snow.",
        "dimensions": [
            {"name": n, "score": s, "comment": f"{n} is fair.", "recommendation": "Crop tighter."} for n, s in dims.items()
        ],
        "overall_score": overall,
        "key_strengths": ["tones"],
        "priority_improvements": ["horizon"],
        "technical_notes": "f/8",
    }
    return data | fields


def analysis_json(overall: float = 7.0, dims: dict[str, float] | None = None, **fields: object) -> str:
    return json.dumps(analysis_dict(overall, dims, **fields))


def random_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A noise JPEG of `size` (width, height): every seed a different picture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def materialize_partition(selection: list[str], advisor: str, resources: dict, instance: dg.DagsterInstance,
                          run_config: dict | None = None) -> dg.ExecuteInProcessResult:  # fmt: skip
    """One advisor's run of `selection`, as the UI launches it; failures are returned, not raised."""
    return dg.materialize(ASSETS, selection=selection, partition_key=advisor, resources=resources, instance=instance,
                          run_config=run_config, raise_on_error=False)  # fmt: skip


def step_events(result: dg.ExecuteInProcessResult, step: str) -> list[str]:
    return [e.event_type_value for e in result.all_events if e.step_key == step]


def hub_cache_with(model_dir: Path, root: Path, monkeypatch, repo_id: str = "Org/Name") -> Path:
    """A Hugging Face cache under `root` holding `model_dir` as `repo_id`'s only snapshot, with the hub offline;
    returns the snapshot folder."""
    import huggingface_hub.constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    cache = root / "hf" / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read once, at import
    return snapshot


def random_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter (rank 4) with non-zero B, saved by mlx-vlm's own trainer utilities into `out`: it moves the
    model and teaches it nothing."""
    import mlx.core as mx
    import mlx_vlm
    from mlx_vlm.trainer import get_peft_model, save_adapter

    model, _ = mlx_vlm.load(str(base))
    model = get_peft_model(model, rank=4, alpha=8.0, dropout=0.0, verbose=False)
    mx.random.seed(1)
    for _, module in model.named_modules():
        if "lora_b" in module:
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.2
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(model, out / "adapters.safetensors")
    return out
