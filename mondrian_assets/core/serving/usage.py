"""Every served request is one `model_usage` row, written before the response leaves; summaries read them back.

The A/B summary reports, per arm, the valid-JSON rate of what users got and, beside it, the rate the model earned
on its own: a constrained answer counts as unaided only when the grammar never overrode the model's greedy choice
(then unconstrained greedy decoding would have produced exactly the same text).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from mondrian_assets.core.state_db import model_usage_table


@dataclass
class UsageRow:
    job_id: str | None
    advisor: str | None
    requested_mode: str | None  # the request's `mode` field as sent (the app sends its own modes, e.g. baseline)
    service_mode: str
    route_mode: str | None = None  # the mode that decided: the service's, or a request override
    arm_draw: float | None = None
    model_used: str | None = None  # base | fine_tuned; None when nothing was generated
    version: int | None = None
    adapter_path: str | None = None
    constrained: bool | None = None
    http_status: int = 500
    latency_s: float = 0.0
    parse_ok: bool | None = None
    parse_error: str | None = None
    grammar_corrections: int | None = None
    generation_tokens: int | None = None
    generation_tps: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    note: str | None = None


def record_usage(engine: sa.Engine, row: UsageRow) -> int:
    """Insert one row; returns its id."""
    values = asdict(row) | {"at": datetime.now(UTC).isoformat(timespec="milliseconds")}
    with engine.begin() as conn:
        return int(conn.execute(sa.insert(model_usage_table).values(**values)).inserted_primary_key[0])


def usage_rows(engine: sa.Engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(model_usage_table).order_by(model_usage_table.c.id)).mappings()]


@dataclass(frozen=True)
class UsageStats:
    requests: int
    served: int  # answered 200 with a generation
    errors: int  # 5xx
    rejected: int  # 4xx
    valid_json: float | None  # share of served answers that parse and validate
    unaided_valid_json: float | None  # ...that did so without the grammar overriding the model
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_mean_s: float | None


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _stats(rows: list[dict]) -> UsageStats:
    served = [r for r in rows if r["http_status"] == 200 and r["model_used"]]
    latencies = [r["latency_s"] for r in served]
    unaided = [bool(r["parse_ok"]) and not (r["constrained"] and r["grammar_corrections"]) for r in served]
    return UsageStats(
        requests=len(rows),
        served=len(served),
        errors=sum(r["http_status"] >= 500 for r in rows),
        rejected=sum(400 <= r["http_status"] < 500 for r in rows),
        valid_json=sum(bool(r["parse_ok"]) for r in served) / len(served) if served else None,
        unaided_valid_json=sum(unaided) / len(served) if served else None,
        latency_p50_s=_quantile(latencies, 0.5),
        latency_p95_s=_quantile(latencies, 0.95),
        latency_mean_s=statistics.fmean(latencies) if latencies else None,
    )


@dataclass(frozen=True)
class ServingSummary:
    by_advisor_model: dict[tuple[str, str], UsageStats]  # (advisor, model_used or "-") -> stats
    ab_arms: dict[str, UsageStats]  # requests an A/B split decided, per arm
    by_version: dict[tuple[str, int], int]  # (advisor, version) -> requests served with it
    total: UsageStats


def serving_summary(engine: sa.Engine) -> ServingSummary:
    rows = usage_rows(engine)
    groups: dict[tuple[str, str], list[dict]] = {}
    arms: dict[str, list[dict]] = {}
    versions: dict[tuple[str, int], int] = {}
    for r in rows:
        groups.setdefault((r["advisor"] or "-", r["model_used"] or "-"), []).append(r)
        if r["arm_draw"] is not None and r["model_used"]:
            arms.setdefault(r["model_used"], []).append(r)
        if r["version"] is not None and r["http_status"] == 200:
            key = (r["advisor"], r["version"])
            versions[key] = versions.get(key, 0) + 1
    return ServingSummary(
        by_advisor_model={k: _stats(v) for k, v in sorted(groups.items())},
        ab_arms={k: _stats(v) for k, v in sorted(arms.items())},
        by_version=dict(sorted(versions.items())),
        total=_stats(rows),
    )


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def summary_text(summary: ServingSummary) -> str:
    """The `mondrian-assets usage` report."""
    if not summary.total.requests:
        return "no requests served yet"
    header = f"{'':<24}{'requests':>9}{'served':>8}{'4xx':>5}{'5xx':>5}{'valid':>7}{'unaided':>9}{'p50':>8}{'p95':>8}"

    def line(label: str, s: UsageStats) -> str:
        return (f"{label:<24}{s.requests:>9}{s.served:>8}{s.rejected:>5}{s.errors:>5}{_rate(s.valid_json):>7}"
                f"{_rate(s.unaided_valid_json):>9}{_seconds(s.latency_p50_s):>8}{_seconds(s.latency_p95_s):>8}")  # fmt: skip

    lines = ["usage per advisor and model (valid: answers that parse; unaided: without the grammar's help)", header]
    lines += [line(f"  {adv} / {model}", s) for (adv, model), s in summary.by_advisor_model.items()]
    lines.append(line("  all", summary.total))
    if summary.ab_arms:
        lines += ["A/B test (requests the split decided), per arm", header]
        lines += [line(f"  {arm}", s) for arm, s in summary.ab_arms.items()]
    if summary.by_version:
        lines.append("fine-tuned versions served: " + ", ".join(f"{a}-v{v}: {n}" for (a, v), n in summary.by_version.items()))
    return "\n".join(lines)
