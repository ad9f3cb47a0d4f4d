"""A synthetic machine-sensor stream with injected faults, deterministic per seed.

Owns the simulated physics the model is trained on and the agent reports: a motor whose
load wanders slowly; current and vibration follow the load, temperature follows it with
a one-minute lag on top of an ambient that differs per device and drifts daily.  Faults
come as episodes (``bearing``: vibration rises and gets noisy; ``overheat``: cooling
fails, temperature climbs; ``overcurrent``: current rises without the load that would
explain it).  The same seed always yields the same samples, on any machine
(``random.Random`` is specified to be platform-independent), so the model build, its
tests and the inference self-test can all regenerate identical data.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

CHANNELS = ("vibration_rms", "temperature_c", "current_a")
# Metric names the agent reports for each channel, in CHANNELS order.
METRICS = ("sensor.vibration_rms", "sensor.temperature_c", "sensor.current_a")
FAULT_KINDS = ("bearing", "overheat", "overcurrent")
WINDOW = 16  # samples per inference window (16 s at the default 1 Hz)

_LOAD_PERIOD = 900.0  # s: a slow production cycle
_DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of the three channels; ``fault`` is the active fault kind, if any."""

    index: int
    vibration_rms: float
    temperature_c: float
    current_a: float
    fault: str | None

    def values(self) -> tuple[float, float, float]:
        """The channel values in ``CHANNELS`` order."""
        return (self.vibration_rms, self.temperature_c, self.current_a)


def seed_for(device_uid: str) -> int:
    """A stable per-device seed (Python's ``hash`` is salted per process; this is not)."""
    return int.from_bytes(hashlib.sha256(device_uid.encode()).digest()[:8], "big")


class SensorStream:
    """An endless, deterministic sample stream for one device.

    ``fault_rate`` is the chance per sample that a fault episode starts (when none is
    active); ``inject`` starts one on demand.
    """

    def __init__(self, seed: int, *, fault_rate: float = 0.002) -> None:
        self._rng = random.Random(seed)
        rng = self._rng
        self.fault_rate = fault_rate
        self._index = 0
        self._phase = rng.uniform(0, 2 * math.pi)
        self._day_phase = rng.uniform(0, 2 * math.pi)
        self._ambient = 22.0 + rng.uniform(-2.0, 2.0)
        self._noise = 0.0
        self._temp = self._ambient + 25.0 * 0.6
        self._fault: str | None = None
        self._fault_left = 0
        self._fault_age = 0
        self._fault_size = 0.0

    @property
    def index(self) -> int:
        """Samples produced so far."""
        return self._index

    def inject(self, kind: str, duration: int = 60, size: float = 1.0) -> None:
        """Start a ``kind`` fault episode now, lasting ``duration`` samples."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (one of {FAULT_KINDS})")
        self._fault, self._fault_left, self._fault_age, self._fault_size = kind, duration, 0, size

    def next(self) -> Sample:
        """The next sample."""
        rng = self._rng
        k = self._index
        self._index += 1
        if self._fault is None and self.fault_rate > 0 and rng.random() < self.fault_rate:
            self.inject(rng.choice(FAULT_KINDS), duration=rng.randint(30, 120), size=rng.uniform(0.6, 1.0))
        # Load: slow cycle plus AR(1) wander, clipped to what a motor does.
        self._noise = 0.95 * self._noise + rng.gauss(0.0, 0.02)
        load = 0.6 + 0.25 * math.sin(2 * math.pi * k / _LOAD_PERIOD + self._phase) + self._noise
        load = min(1.0, max(0.05, load))
        current = 2.0 + 12.0 * load + rng.gauss(0.0, 0.15)
        vibration = 0.20 + 0.5 * load + rng.gauss(0.0, 0.02)
        ambient = self._ambient + 1.0 * math.sin(2 * math.pi * k / _DAY + self._day_phase)
        # First-order lag (60 s time constant) toward the load's steady-state temperature.
        self._temp += (ambient + 25.0 * load - self._temp) / 60.0 + rng.gauss(0.0, 0.05)
        temperature = self._temp + rng.gauss(0.0, 0.1)
        fault = self._fault
        if fault is not None:
            ramp = min(1.0, (self._fault_age + 1) / 8.0) * self._fault_size
            if fault == "bearing":
                vibration += 0.6 * ramp + abs(rng.gauss(0.0, 0.08 * ramp))
            elif fault == "overheat":
                temperature += 18.0 * ramp
            else:  # overcurrent
                current *= 1.0 + 0.45 * ramp
            self._fault_age += 1
            self._fault_left -= 1
            if self._fault_left <= 0:
                self._fault = None
        return Sample(k, round(vibration, 4), round(temperature, 3), round(current, 3), fault)

    def __iter__(self) -> Iterator[Sample]:
        while True:
            yield self.next()

    def take(self, n: int) -> tuple[np.ndarray, list[str | None]]:
        """``n`` samples as a float32 array ``[n, 3]`` plus their fault labels."""
        samples = [self.next() for _ in range(n)]
        return np.array([s.values() for s in samples], dtype=np.float32), [s.fault for s in samples]


def windows(values: np.ndarray, labels: list[str | None], *, size: int = WINDOW,
            stride: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Sliding windows ``[m, size, 3]`` and, per window, the fraction of its samples that
    fall inside a fault episode."""
    faulty = np.array([lab is not None for lab in labels], dtype=np.float32)
    starts = range(0, len(values) - size + 1, stride)
    out = np.stack([values[s:s + size] for s in starts]).astype(np.float32)
    frac = np.array([faulty[s:s + size].mean() for s in starts], dtype=np.float32)
    return out, frac
