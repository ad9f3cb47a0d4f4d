"""Gates: small, pluggable evaluators the orchestrator consults.

Two registries:
- wave gates judge a wave's outcome (`success_ratio`, `failure`, `telemetry`). A wave
  gate returns ok True/False, or None when it cannot judge yet (too few samples, or a
  gate that only judges at the end of the soak). `failure` and `telemetry` are checked on
  every step, so a regression trips as soon as it is visible; `success_ratio` at the end
  of the soak.
- offer gates filter devices just before an offer (`attestation`): devices they hold
  back stay pending (`hold` says why) and are re-checked later; they do not block a
  wave from finishing.

Another app can add a gate with `@wave_gate("name")` / `@offer_gate("name")` plus a
validator; rollouts asks telemetry and security for answers through one function each.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fleet.errors import InvalidInput

FAILURE_STATES = ("failed", "rolled_back", "timed_out", "rejected")


@dataclass
class GateResult:
    gate: str
    ok: bool | None
    value: float | None = None
    threshold: float | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "value": self.value, "threshold": self.threshold, "detail": self.detail}


@dataclass
class WaveContext:
    """What a wave gate may look at. Device-id lists are loaded lazily and bounded."""

    campaign: Any
    wave: int
    counts: dict[str, int]  # executions of this wave by state ("offered" counts delivered and not)
    now: dt.datetime
    final: bool  # the soak is over: gates that judge only at the end judge now
    wave_devices: Callable[[int], list[int]] = field(repr=False, default=lambda limit: [])
    untouched_devices: Callable[[int], list[int]] = field(repr=False, default=lambda limit: [])

    @property
    def committed(self) -> int:
        return self.counts.get("committed", 0)

    @property
    def failures(self) -> int:
        return sum(self.counts.get(s, 0) for s in FAILURE_STATES)

    @property
    def targeted(self) -> int:
        """Executions that were meant to run in this wave (offered, running or finished)."""
        skipped = ("incompatible", "pinned", "superseded", "canceled")
        return sum(n for s, n in self.counts.items() if s not in skipped)


@dataclass(frozen=True)
class Gate:
    name: str
    validate: Callable[[dict], dict]
    evaluate: Callable[..., Any]


WAVE_GATES: dict[str, Gate] = {}
OFFER_GATES: dict[str, Gate] = {}


def wave_gate(name: str, *, validate: Callable[[dict], dict]) -> Callable:
    def register(fn: Callable[[dict, WaveContext], GateResult]) -> Callable:
        WAVE_GATES[name] = Gate(name, validate, fn)
        return fn
    return register


def offer_gate(name: str, *, validate: Callable[[dict], dict]) -> Callable:
    def register(fn: Callable[[dict, Any, list[int]], set[int]]) -> Callable:
        OFFER_GATES[name] = Gate(name, validate, fn)
        return fn
    return register


def _number(spec: dict, key: str, *, default: float | None = None, lo: float | None = None,
            hi: float | None = None) -> float:
    value = spec.get(key, default)
    if value is None:
        raise InvalidInput(f"gate {spec.get('type')!r} needs {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"gate {spec.get('type')!r}: {key} must be a number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidInput(f"gate {spec.get('type')!r}: {key} must be within {lo}..{hi}")
    return value


ACTIONS = ("pause", "abort", "abort_and_revert")


def validate_gate(spec: Any, registry: dict[str, Gate]) -> dict:
    if not isinstance(spec, dict) or spec.get("type") not in registry:
        raise InvalidInput(f"a gate is an object with a type among {', '.join(sorted(registry))}")
    cleaned = registry[spec["type"]].validate(spec)
    action = spec.get("action")
    if action is not None and action not in ACTIONS:
        raise InvalidInput(f"gate action must be one of {', '.join(ACTIONS)}")
    return {"type": spec["type"], **cleaned, **({"action": action} if action else {})}


# --- wave gates -------------------------------------------------------------------------

def _validate_success(spec: dict) -> dict:
    return {"min_ratio": _number(spec, "min_ratio", lo=0, hi=1)}


@wave_gate("success_ratio", validate=_validate_success)
def success_ratio(spec: dict, ctx: WaveContext) -> GateResult:
    """Committed / targeted at the end of the soak (offline devices count as not yet successful)."""
    if ctx.targeted == 0:
        return GateResult("success_ratio", True, None, spec["min_ratio"], "no device in this wave")
    ratio = ctx.committed / ctx.targeted
    if not ctx.final:
        return GateResult("success_ratio", None, ratio, spec["min_ratio"], "judged at the end of the soak")
    return GateResult("success_ratio", ratio >= spec["min_ratio"], ratio, spec["min_ratio"],
                      f"{ctx.committed} of {ctx.targeted} committed")


def _validate_failure(spec: dict) -> dict:
    return {"max_pct": _number(spec, "max_pct", lo=0, hi=100),
            "min_sample": int(_number(spec, "min_sample", default=1, lo=1))}


@wave_gate("failure", validate=_validate_failure)
def failure(spec: dict, ctx: WaveContext) -> GateResult:
    """Failures / decided executions, once at least `min_sample` are decided; checked continuously."""
    decided = ctx.committed + ctx.failures
    pct = 100.0 * ctx.failures / decided if decided else 0.0
    if decided < spec["min_sample"]:
        return GateResult("failure", None, pct, spec["max_pct"], f"{decided} decided, need {spec['min_sample']}")
    return GateResult("failure", pct <= spec["max_pct"], pct, spec["max_pct"],
                      f"{ctx.failures} of {decided} decided executions failed")


def _validate_telemetry(spec: dict) -> dict:
    metric = spec.get("metric")
    if not isinstance(metric, str) or not metric:
        raise InvalidInput("telemetry gate needs a metric name")
    agg = spec.get("agg", "avg")
    if agg not in ("avg", "min", "max", "sum", "count"):
        raise InvalidInput("telemetry gate agg must be avg, min, max, sum or count")
    direction = spec.get("bad_direction", "increase")
    if direction not in ("increase", "decrease"):
        raise InvalidInput("telemetry gate bad_direction must be increase or decrease")
    return {"metric": metric, "agg": agg, "bad_direction": direction,
            "tolerance_pct": _number(spec, "tolerance_pct", default=10, lo=0),
            "tolerance_abs": _number(spec, "tolerance_abs", default=0, lo=0),
            "min_samples": int(_number(spec, "min_samples", default=10, lo=1)),
            "require_data": bool(spec.get("require_data", False))}


@wave_gate("telemetry", validate=_validate_telemetry)
def telemetry(spec: dict, ctx: WaveContext) -> GateResult:
    """The wave's committed devices vs untouched devices over the soak window so far.

    Without untouched devices (the last wave), the baseline is the same devices over an
    equally long window just before the wave started."""
    from telemetry.selectors import wave_metric

    campaign = ctx.campaign
    start = campaign.wave_drained_at or campaign.wave_started_at or ctx.now
    end = ctx.now
    if end - start < dt.timedelta(seconds=1):
        return GateResult("telemetry", None, None, None, "soak window not started")
    wave_ids = ctx.wave_devices(2000)
    wave = wave_metric(device_ids=wave_ids, metric=spec["metric"], start=start, end=end, agg=spec["agg"])
    base = wave_metric(device_ids=ctx.untouched_devices(2000), metric=spec["metric"], start=start, end=end,
                       agg=spec["agg"])
    against = "untouched devices"
    if base.value is None or base.samples < spec["min_samples"]:
        before = (campaign.wave_started_at or start) - (end - start)
        base = wave_metric(device_ids=wave_ids, metric=spec["metric"], start=before,
                           end=campaign.wave_started_at or start, agg=spec["agg"])
        against = "the same devices before the wave"
    if (wave.value is None or base.value is None or wave.samples < spec["min_samples"]
            or base.samples < spec["min_samples"]):
        ok = (not spec["require_data"]) if ctx.final else None
        return GateResult("telemetry", ok, wave.value, base.value,
                          f"not enough data ({wave.samples} wave samples, {base.samples} baseline samples)")
    change = wave.value - base.value if spec["bad_direction"] == "increase" else base.value - wave.value
    allowed = max(abs(base.value) * spec["tolerance_pct"] / 100.0, spec["tolerance_abs"])
    ok = change <= allowed
    return GateResult("telemetry", ok, wave.value, base.value,
                      f"{spec['agg']}({spec['metric']}) {wave.value:.4g} on {wave.devices} wave devices vs "
                      f"{base.value:.4g} on {against} (allowed {spec['bad_direction']} {allowed:.4g})")


# --- offer gates ------------------------------------------------------------------------

def _validate_attestation(spec: dict) -> dict:
    return {"max_age_s": _number(spec, "max_age_s", default=3600, lo=1)}


@offer_gate("attestation", validate=_validate_attestation)
def attestation(spec: dict, campaign: Any, device_ids: Iterable[int]) -> set[int]:
    """Only devices whose latest attestation is affirming and fresh pass."""
    from security.selectors import attestation_fresh

    return attestation_fresh(device_ids=device_ids, max_age_s=spec["max_age_s"])
