"""Which model answers a request: the service's mode, a request's own `mode`, and the A/B arm of a job.

The arm is a pure function of the job id (a hash), so a job always lands on the same arm, on any replica, after
any restart. The app's job service sends no job id: a request without one is given `image-<content hash>`, so a
retried upload of the same picture also keeps its arm.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass


class ServiceMode(enum.StrEnum):
    BASE = "base"
    FINE_TUNED = "fine_tuned"
    AB_TEST = "ab_test"


class Model(enum.StrEnum):
    BASE = "base"
    FINE_TUNED = "fine_tuned"


# A request's `mode` overrides the service's only when it names a model choice. The app's upload form sends its
# own analysis modes (`baseline`, `rag`, ...): those, and any value we do not know, leave the service's mode in
# charge and never fail the request.
REQUEST_MODES: dict[str, ServiceMode] = {
    "base": ServiceMode.BASE,
    "base_model": ServiceMode.BASE,
    "fine_tuned": ServiceMode.FINE_TUNED,
    "fine-tuned": ServiceMode.FINE_TUNED,
    "lora": ServiceMode.FINE_TUNED,
    "ab_test": ServiceMode.AB_TEST,
    "ab": ServiceMode.AB_TEST,
}


@dataclass(frozen=True)
class Route:
    model: Model
    mode: ServiceMode  # the mode that decided (the service's, or the request's override)
    arm_draw: float | None = None  # the job's point in [0, 1) when an A/B split decided
    note: str = ""  # why a request's mode was not used, when it was not


def job_key_for(job_id: str | None, image_sha256: str) -> str:
    """The job id a request is accounted under: its own, or one derived from the image's content."""
    job = (job_id or "").strip()
    return job or f"image-{image_sha256[:32]}"


def arm_draw(job_id: str) -> float:
    """A uniform point in [0, 1) that depends on the job id alone."""
    digest = hashlib.sha256(f"ab-arm:{job_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def route(service_mode: ServiceMode, requested: str | None, job_id: str, fine_tuned_share: float) -> Route:
    """`fine_tuned_share` of the jobs (by their draw) go to the fine-tuned arm in an A/B test."""
    mode, note = service_mode, ""
    asked = (requested or "").strip().lower()
    if asked:
        if asked in REQUEST_MODES:
            mode = REQUEST_MODES[asked]
        else:
            note = f"request mode {requested!r} names no model choice; the service mode {service_mode} applies"
    if mode is ServiceMode.AB_TEST:
        draw = arm_draw(job_id)
        return Route(Model.FINE_TUNED if draw < fine_tuned_share else Model.BASE, mode, draw, note)
    return Route(Model(mode.value), mode, None, note)
