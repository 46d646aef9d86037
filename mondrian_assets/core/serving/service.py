"""The advisor service, without HTTP: route a request, generate in a worker, parse, account, answer.

Every `/analyze` request, whatever becomes of it (served, refused, failed), is one `model_usage` row written
before the reply is returned. A fine-tuned answer names the version whose adapter the worker loaded and verified
for that very request: the active version is looked up in the registry per request, so a deploy or a rollback
takes effect on the next request, with no restart, while requests already running finish on the version they
started with.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from mondrian_assets.core import schema
from mondrian_assets.core.data import app_db
from mondrian_assets.core.base_model import resolve_base, same_base
from mondrian_assets.core.data.images import MAX_IMAGE_PIXELS
from mondrian_assets.core.locations import Locations
from mondrian_assets.core.registry.versions import Version, active_version
from mondrian_assets.core.serving import render
from mondrian_assets.core.serving.pool import (
    JobFailed,
    PoolClosed,
    PoolSaturated,
    WorkerDied,
    WorkerPool,
    WorkerTimeout,
)
from mondrian_assets.core.serving.routing import Model, ServiceMode, job_key_for, route
from mondrian_assets.core.serving.uploads import UploadRejected, prepare_upload
from mondrian_assets.core.serving.usage import UsageRow, record_usage, serving_summary
from mondrian_assets.core.serving.worker import Job, JobResult, WorkerSpec
from mondrian_assets.core.state_db import state_engine

DEFAULT_ADVISOR = "ansel"  # what the app's own service assumes when a request names none
MISSING_VERSION_POLICIES = ("refuse", "base")


@dataclass(frozen=True)
class ServiceConfig:
    base_model: str
    mode: ServiceMode = ServiceMode.FINE_TUNED
    ab_split: float = 0.5  # share of A/B jobs on the fine-tuned arm
    constrained: bool = True  # schema-valid JSON guaranteed by a grammar mask
    missing_version: str = "refuse"  # fine-tuned asked, no active version: "refuse" (409) or "base" (said so)
    workers: int = 1
    max_waiting: int = 4
    max_upload_bytes: int = 25 * 1024 * 1024
    max_pixels: int = MAX_IMAGE_PIXELS
    max_tokens: int = 1536
    job_timeout_s: float = 280.0  # under the app's 300 s client timeout, so it hears our answer
    fused_cache_size: int = 2
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ab_split <= 1.0:
            raise ValueError(f"ab_split must be within [0, 1], got {self.ab_split}")
        if self.missing_version not in MISSING_VERSION_POLICIES:
            raise ValueError(f"missing_version must be one of {MISSING_VERSION_POLICIES}, got {self.missing_version!r}")


@dataclass(frozen=True)
class AnalyzeForm:
    image: bytes
    filename: str | None = None
    advisor: str | None = None
    job_id: str | None = None
    mode: str | None = None
    enable_rag: str | None = None  # accepted for the app's contract; retrieval is not part of this service


@dataclass
class _Outcome:
    """What one request came to: the reply and the usage row, built together so they cannot disagree."""

    row: UsageRow
    status: int = 500
    body: dict = field(default_factory=dict)

    def fail(self, status: int, code: str, message: str) -> None:
        self.status, self.row.http_status, self.row.error = status, status, f"{code}: {message}"
        self.body = {"error": code, "message": message}


class AdvisorService:
    def __init__(self, config: ServiceConfig, locations: Locations):
        self.config = config
        self.locations = locations
        self.engine = state_engine(locations.state_db)
        self.app_engine = app_db.read_only_engine(locations.db_path)
        # workers load the resolved folder: a hub id is looked up in the local cache once, never downloaded
        base_folder = str(resolve_base(config.base_model).path)
        spec = WorkerSpec(base_folder, config.dtype, config.fused_cache_size, config.constrained)
        self.pool = WorkerPool(spec, size=config.workers, max_waiting=config.max_waiting,
                               job_timeout_s=config.job_timeout_s)  # fmt: skip
        self._scratch = tempfile.TemporaryDirectory(prefix="mondrian-serve-")
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- life cycle ---

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.pool.start()

    def begin_shutdown(self) -> None:
        """Safe to call from a signal handler: the pool is told on its own event loop."""
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self.pool.begin_shutdown)
        else:
            self.pool.begin_shutdown()

    async def close(self) -> None:
        await self.pool.close()
        self._scratch.cleanup()

    # --- what the service knows ---

    def _advisors(self) -> tuple[dict[str, app_db.AdvisorRow], str | None]:
        with self.app_engine.connect() as conn:
            return app_db.read_advisors(conn), app_db.read_system_prompt(conn)

    def health(self) -> tuple[int, dict]:
        pool = self.pool.status()
        if pool.closing:
            return 503, {"status": "error", "error": "the service is shutting down"}
        if not pool.ready and not pool.busy:
            if pool.starting:
                return 202, {"status": "loading", "progress": 0.0,
                             "message": f"loading {self.config.base_model} in {pool.starting} worker(s)"}  # fmt: skip
            return 503, {"status": "error", "error": pool.load_error or "no generation worker is running"}
        advisors, _ = self._advisors()
        versions = {a: active_version(self.engine, a) for a in sorted(advisors)}
        default = versions.get(DEFAULT_ADVISOR)
        return 200, {
            "status": "UP",
            "model": self.config.base_model,
            "base_model": self.config.base_model,
            "device": pool.device,
            "mode": str(self.config.mode),
            "ab_split": self.config.ab_split,
            "fine_tuned": self.config.mode is not ServiceMode.BASE,
            "lora_path": str(default.path) if default and self.config.mode is not ServiceMode.BASE else None,
            "constrained": self.config.constrained,
            "missing_version": self.config.missing_version,
            "advisors": {a: ({"active_version": v.number, "adapter": str(v.path)} if v else {"active_version": None})
                         for a, v in versions.items()},  # fmt: skip
            "workers": pool.as_dict(),
        }

    def usage_summary(self) -> dict:
        summary = serving_summary(self.engine)
        return {
            "total": summary.total.__dict__,
            "by_advisor_model": {f"{a}/{m}": s.__dict__ for (a, m), s in summary.by_advisor_model.items()},
            "ab_arms": {arm: s.__dict__ for arm, s in summary.ab_arms.items()},
            "by_version": {f"{a}-v{v}": n for (a, v), n in summary.by_version.items()},
        }

    # --- requests ---

    def _new_row(self, advisor: str | None, job_id: str | None, mode: str | None) -> UsageRow:
        return UsageRow(job_id=job_id, advisor=advisor, requested_mode=mode, service_mode=str(self.config.mode))

    async def reject(self, rejected: UploadRejected, advisor: str | None = None) -> tuple[int, dict]:
        """A request refused before its form could be read (too large, not multipart): still one usage row."""
        outcome = _Outcome(self._new_row(advisor, None, None))
        outcome.fail(rejected.status, rejected.code, str(rejected))
        return self._finish(outcome, time.perf_counter())

    async def analyze(self, form: AnalyzeForm) -> tuple[int, dict]:
        started = time.perf_counter()
        advisor = (form.advisor or "").strip() or DEFAULT_ADVISOR
        outcome = _Outcome(self._new_row(advisor, form.job_id, form.mode))
        try:
            await self._analyze(form, advisor, outcome)
        except asyncio.CancelledError:  # the server gave up on this request (shutdown past its grace period)
            outcome.fail(503, "shutting_down", "the service stopped before this request finished")
            self._finish(outcome, started)
            raise
        except Exception as exc:  # an unexpected failure is still an answer and a row, never a silent drop
            outcome.fail(500, "internal_error", f"{type(exc).__name__}: {exc}")
        return self._finish(outcome, started)

    def _finish(self, outcome: _Outcome, started: float) -> tuple[int, dict]:
        outcome.row.latency_s = round(time.perf_counter() - started, 4)
        outcome.body["latency_s"] = outcome.row.latency_s
        outcome.body["usage_id"] = record_usage(self.engine, outcome.row)
        return outcome.status, outcome.body

    async def _analyze(self, form: AnalyzeForm, advisor: str, outcome: _Outcome) -> None:
        row = outcome.row
        advisors, system_prompt = self._advisors()
        if advisor not in advisors:
            known = ", ".join(sorted(advisors)) or "none"
            return outcome.fail(404, "unknown_advisor", f"no advisor {advisor!r} in the app's database (known: {known})")
        try:
            # decoding is CPU work: off the event loop, so /health and other requests stay answered meanwhile
            upload = await asyncio.to_thread(prepare_upload, form.image, max_pixels=self.config.max_pixels)
        except UploadRejected as rejected:
            return outcome.fail(rejected.status, rejected.code, str(rejected))

        row.job_id = job_key_for(form.job_id, upload.sha256)
        chosen = route(self.config.mode, form.mode, row.job_id, self.config.ab_split)
        row.route_mode, row.arm_draw, row.note = str(chosen.mode), chosen.arm_draw, chosen.note or None
        version: Version | None = None
        if chosen.model is Model.FINE_TUNED:
            version = active_version(self.engine, advisor)
            if version is None:
                reason = f"advisor {advisor!r} has no active fine-tuned version"
                if self.config.missing_version == "refuse":
                    return outcome.fail(409, "no_active_version", reason + " (deploy one, or ask for mode=base)")
                row.note = "; ".join(filter(None, [row.note, reason + ": served the base model (missing_version=base)"]))
            elif not same_base(version.base_model, self.config.base_model):
                return outcome.fail(500, "base_model_mismatch", f"{version.name} was trained on {version.base_model}; "
                                    f"this service runs {self.config.base_model}")  # fmt: skip
        model_used = Model.FINE_TUNED if version is not None else Model.BASE

        prompt = schema.build_prompt(system_prompt, advisors[advisor].prompt)
        image_path = Path(self._scratch.name) / f"{uuid.uuid4().hex}.jpg"  # per request: the same photo may be in flight twice
        image_path.write_bytes(upload.jpeg)
        job = Job(str(image_path), prompt, self.config.max_tokens, self.config.constrained,
                  str(version.path) if version else None, version.content_hash if version else None)  # fmt: skip
        row.constrained = self.config.constrained
        try:
            result = await self.pool.run(job)
        except PoolSaturated as exc:
            return outcome.fail(503, "saturated", str(exc))
        except PoolClosed as exc:
            return outcome.fail(503, "unavailable", str(exc))
        except WorkerDied as exc:
            return outcome.fail(500, "worker_died", f"{exc}; a new worker is starting, retry the request")
        except WorkerTimeout as exc:
            return outcome.fail(504, "generation_timeout", str(exc))
        except JobFailed as exc:
            return outcome.fail(500, "generation_failed", str(exc))
        finally:
            image_path.unlink(missing_ok=True)

        row.model_used = str(model_used)
        if version is not None:
            row.version, row.adapter_path = version.number, str(version.path)
        self._answer(outcome, advisors[advisor], prompt, result, chosen.mode, version)

    def _answer(self, outcome: _Outcome, advisor: app_db.AdvisorRow, prompt: str, result: JobResult,
                mode: ServiceMode, version: Version | None) -> None:  # fmt: skip
        row = outcome.row
        thinking, answer = schema.split_thinking(result.text)
        parsed = schema.parse_analysis(answer)
        row.parse_ok, row.parse_error = parsed.ok, None if parsed.ok else f"{parsed.error}: {parsed.detail}"
        row.grammar_corrections, row.finish_reason = result.grammar_corrections, result.finish_reason
        row.generation_tokens, row.generation_tps = result.generation_tokens, round(result.generation_tps, 2)
        row.http_status = outcome.status = 200
        analysis = parsed.analysis
        canonical = schema.analysis_to_dict(analysis) if analysis else None
        model_label = Path(self.config.base_model).name + (f"+{version.path.name}" if version else "")
        outcome.body = {
            "job_id": row.job_id,
            "advisor": advisor.id,
            "analysis": canonical,
            "parse_success": parsed.ok,
            "parse_error": row.parse_error,
            "overall_score": canonical["overall_score"] if canonical else None,
            "full_response": answer,
            "llm_thinking": thinking,
            "summary": render.summary_text(analysis) if analysis else "",
            "prompt": prompt,
            "llm_prompt": prompt,
            "model": model_label,
            "model_used": row.model_used,
            "version": version.number if version else None,
            "adapter": str(version.path) if version else None,
            "adapter_tensors_verified": result.adapter_tensors_verified,
            "mode": str(mode),
            "requested_mode": row.requested_mode,
            "arm_draw": row.arm_draw,
            "constrained": row.constrained,
            "grammar_corrections": result.grammar_corrections,
            "decoding": result.decoding,
            "score_values_by_rule": result.score_values_by_rule,
            "finish_reason": result.finish_reason,
            "generation_tokens": result.generation_tokens,
            "note": row.note,
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
            "analysis_html": render.analysis_html(analysis, advisor.name) if analysis else render.failure_html(
                advisor.name, row.parse_error or ""),
            "summary_html": render.summary_html(analysis, advisor.name) if analysis else "",
            "advisor_bio": advisor.bio or "",
            "advisor_bio_html": render.bio_html(advisor.bio) if advisor.bio else "",
        }
