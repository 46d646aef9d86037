"""The generation worker: a child process that holds the models and answers one job at a time.

MLX runs only here, so a crash inside it (a segfault, an abort, the OOM killer) ends this process, not the
service; the pool notices, fails that one request with the cause, and starts a replacement.
Each worker loads the base model once; a fine-tuned version is loaded as evaluation loads it (adapter applied,
verified tensor by tensor, fused) on its first request, and kept in a small LRU cache, so switching versions
after a deploy or a rollback costs one load and never a restart.
"""

from __future__ import annotations

import dataclasses
import gc
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class WorkerSpec:
    base_model: str
    dtype: str = "auto"
    fused_cache_size: int = 2  # fine-tuned versions kept loaded per worker (each a full fused copy)
    constrained: bool = True  # build the grammar at start-up (a request may still switch it off)


@dataclass(frozen=True)
class Job:
    image_path: str
    prompt: str
    max_tokens: int
    constrained: bool
    adapter_path: str | None = None  # None: the base model
    adapter_hash: str | None = None  # the registry's content hash of that version: what must be loaded
    seed: int = 0


@dataclass(frozen=True)
class JobResult:
    text: str
    adapter_path: str | None
    adapter_tensors_verified: int
    prompt_tokens: int
    generation_tokens: int
    generation_tps: float
    finish_reason: str
    grammar_corrections: int | None  # steps where the grammar overrode the model's own greedy choice
    seconds: float
    score_values_by_rule: int  # score values the expected-value rule wrote
    decoding: str  # how it decoded (`generate.decoding_label`): the score rule, or greedy where none applies


class _Models:
    def __init__(self, spec: WorkerSpec):
        from mondrian_assets.core.inference.loading import load_for_inference

        self.spec = spec
        self.base = load_for_inference(spec.base_model, None, dtype=spec.dtype)
        self._fused: OrderedDict[str, Any] = OrderedDict()
        self.constraint = None
        if spec.constrained:
            from mondrian_assets.core.inference.constrained import AnalysisConstraint

            self.constraint = AnalysisConstraint.for_processor(self.base.processor)

    def get(self, adapter_path: str | None, adapter_hash: str | None) -> Any:
        from mondrian_assets.core.inference.loading import AdapterNotApplied, load_for_inference
        from mondrian_assets.core.registry.versions import adapter_content_hash

        if adapter_path is None:
            return self.base
        key = f"{adapter_path}#{adapter_hash}"
        if key in self._fused:
            self._fused.move_to_end(key)
            return self._fused[key]
        if adapter_hash is not None and adapter_content_hash(Path(adapter_path)) != adapter_hash:
            raise AdapterNotApplied(f"{adapter_path} does not hold the registered adapter (its content hash differs)")
        while len(self._fused) >= max(1, self.spec.fused_cache_size):
            self._fused.popitem(last=False)
            gc.collect()
        # load_for_inference verifies every adapter tensor landed in the model before it fuses (AdapterNotApplied)
        loaded = load_for_inference(self.spec.base_model, Path(adapter_path), dtype=self.spec.dtype)
        self._fused[key] = loaded
        return loaded

    def run(self, job: Job) -> JobResult:
        from mondrian_assets.core.inference.generate import decoding_label, eos_ids, generate_one

        loaded = self.get(job.adapter_path, job.adapter_hash)
        mask = None
        if job.constrained:
            if self.constraint is None:
                from mondrian_assets.core.inference.constrained import AnalysisConstraint

                self.constraint = AnalysisConstraint.for_processor(self.base.processor)
            mask = self.constraint.processor(job.max_tokens)
        generation = generate_one(
            loaded, Path(job.image_path), job.prompt, max_tokens=job.max_tokens, seed=job.seed,
            logits_processors=[mask] if mask is not None else [],
        )  # fmt: skip
        if mask is not None and generation.finish_reason == "stop":
            mask.settle(set(eos_ids(loaded)))
        return JobResult(
            text=generation.text,
            adapter_path=job.adapter_path,
            adapter_tensors_verified=loaded.adapter_tensors,
            prompt_tokens=generation.prompt_tokens,
            generation_tokens=generation.generation_tokens,
            generation_tps=generation.generation_tps,
            finish_reason=generation.finish_reason,
            grammar_corrections=mask.corrections if mask is not None else None,
            seconds=generation.latency_s,
            score_values_by_rule=generation.score_values_by_rule,
            decoding=decoding_label(True, loaded.tokenizer),
        )


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Load, say ready (or why not), then answer jobs until told to stop (None) or the pipe closes."""
    try:
        models = _Models(spec)
    except Exception as exc:  # the parent reports it on /health; nothing else could use this worker
        conn.send({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    import mlx.core as mx

    conn.send({"ready": True, "device": str(mx.default_device())})
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the service is gone
            return
        if job is None:
            return
        try:
            conn.send({"ok": True, "result": dataclasses.asdict(models.run(job))})
        except Exception as exc:  # a failed job is an answer; the worker stays up for the next one
            conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=5)})
