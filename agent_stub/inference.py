"""Running the anomaly model: load, score, self-test, and share one session among devices.

Owns the agent's choice of inference backend.  ``AnomalyModel`` wraps one session loaded
from a path, so OTA can load a candidate next to the running model, ``self_test`` it and
swap.  Two backends run the same ONNX file:

* ``numpy`` (``agent_stub.onnx_numpy``): a small interpreter for the operators our models
  use; no native library, ~28 MB less resident memory than ONNX Runtime (footprint
  benchmark: 80 → 52 MB RSS), equal results to float32 rounding, ~0.2 ms per window:
  plenty for one device's 1 Hz windows.
* ``onnxruntime``: one ``InferenceSession`` (one intra-op thread: an edge box has other
  work; no memory arena or memory pattern: a 1.4 KB graph does not need them).

``backend="auto"`` (the default, or ``AGENT_INFERENCE_BACKEND``) uses numpy when it runs
every operator of the model and ONNX Runtime otherwise (an OTA'd model with other
operators still loads where ONNX Runtime is installed); the simulator asks for
``onnxruntime`` when it is there (its batched thousands of devices favour it).
``BatchScorer`` lets the simulator's devices share that one session: scores requested in
the same event-loop turn run as one batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent_stub.sensors import CHANNELS, FAULT_KINDS, WINDOW, SensorStream

log = logging.getLogger(__name__)

MODEL_DIR = Path(__file__).resolve().parent / "model"
DEFAULT_MODEL = MODEL_DIR / "anomaly-1.0.0.onnx"
SELF_TEST_SEED = 424242
BACKENDS = ("auto", "numpy", "onnxruntime")
BACKEND_ENV = "AGENT_INFERENCE_BACKEND"


class ModelError(Exception):
    """The model file cannot be loaded or does not have the expected interface."""


@dataclass(frozen=True, slots=True)
class SelfTestReport:
    """What ``AnomalyModel.check`` found: ``ok`` and, if not, why."""

    ok: bool
    reason: str
    good_max: float = float("nan")
    fault_min: float = float("nan")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def self_test_windows() -> tuple[np.ndarray, np.ndarray]:
    """Known-good and known-fault windows ``[n, WINDOW, 3]``, fixed for every model.

    Good: six windows of a fault-free stream.  Fault: one window per fault kind, taken
    once the fault has fully ramped up.
    """
    stream = SensorStream(SELF_TEST_SEED, fault_rate=0.0)
    good = [stream.take(WINDOW)[0] for _ in range(6)]
    faults = []
    for kind in FAULT_KINDS:
        stream.take(4 * WINDOW)  # let the previous fault's effects settle
        stream.inject(kind, duration=3 * WINDOW)
        stream.take(WINDOW)
        faults.append(stream.take(WINDOW)[0])
    return np.stack(good), np.stack(faults)


class AnomalyModel:
    """One loaded anomaly model.

    Reads the ``.json`` sidecar next to the ``.onnx`` for version and threshold; without
    one, ``threshold`` must be given.
    """

    def __init__(self, path: str | Path = DEFAULT_MODEL, *, threshold: float | None = None,
                 intra_op_threads: int = 1, backend: str | None = None) -> None:
        self.path = Path(path)
        sidecar_path = self.path.with_suffix(".json")
        self.meta: dict[str, Any] = {}
        if sidecar_path.exists():
            self.meta = json.loads(sidecar_path.read_text())
        self.version: str = str(self.meta.get("version", "unknown"))
        thr = threshold if threshold is not None else self.meta.get("threshold")
        if thr is None:
            raise ModelError(f"{self.path}: no threshold (no sidecar {sidecar_path.name} and none given)")
        self.threshold = float(thr)
        self.sha256 = file_sha256(self.path)
        wanted = backend or os.environ.get(BACKEND_ENV) or "auto"
        if wanted not in BACKENDS:
            raise ModelError(f"unknown inference backend {wanted!r} (one of {', '.join(BACKENDS)})")
        self.session: Any = None
        self.backend = ""
        if wanted in ("auto", "numpy"):
            from agent_stub.onnx_numpy import NumpySession, OnnxFormatError, UnsupportedModel

            try:
                self.session, self.backend = NumpySession(self.path), "numpy"
            except (OnnxFormatError, OSError) as exc:
                raise ModelError(f"{self.path}: cannot load model: {exc}") from exc
            except UnsupportedModel as exc:
                if wanted == "numpy":
                    raise ModelError(f"{self.path}: the numpy backend cannot run it: {exc}") from exc
                log.info("%s: %s; using onnxruntime", self.path, exc)
            if self.session is not None:
                names = self.session.input_names()
                if len(names) != 1:
                    raise ModelError(f"{self.path}: expected one input, got {len(names)}")
                self.input_name, self.output_name = names[0], self.session.output_names()[0]
                return
        self._load_onnxruntime(intra_op_threads)

    def _load_onnxruntime(self, intra_op_threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelError(f"{self.path}: needs onnxruntime, which is not installed: {exc}") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # onnxruntime warnings would drown the agent's log
        # A tiny graph at 1 Hz: no arena or pre-planned memory pattern to keep resident.
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises several private exception types
            raise ModelError(f"{self.path}: cannot load model: {exc}") from exc
        self.backend = "onnxruntime"
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"{self.path}: expected one input, got {len(inputs)}")
        self.input_name = inputs[0].name
        self.output_name = self.session.get_outputs()[0].name

    def score_batch(self, batch: np.ndarray) -> np.ndarray:
        """Scores for windows ``[n, WINDOW, 3]`` (float32 ``[n]`` from a sound model)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def score(self, window: np.ndarray) -> float:
        """Score of one window ``[WINDOW, 3]``."""
        return float(self.score_batch(np.asarray(window, dtype=np.float32)[None])[0])

    def is_anomaly(self, score: float) -> bool:
        """Whether ``score`` is above this model's threshold."""
        return score > self.threshold

    def check(self) -> SelfTestReport:
        """Run the fixed known-good and known-fault windows; see ``self_test``."""
        good, fault = self_test_windows()
        try:
            out = self.score_batch(np.concatenate([good, fault]))
        except Exception as exc:  # noqa: BLE001 - any failure to run is a failed self-test
            return SelfTestReport(False, f"model failed to run: {exc}")
        n = len(good) + len(fault)
        if out.shape != (n,):
            return SelfTestReport(False, f"output shape {out.shape}, expected ({n},)")
        if not np.all(np.isfinite(out)):
            return SelfTestReport(False, "output is not finite")
        good_max, fault_min = float(out[: len(good)].max()), float(out[len(good):].min())
        if not good_max < self.threshold < fault_min:
            return SelfTestReport(False, f"scores not ordered: good max {good_max:.3g}, threshold "
                                  f"{self.threshold:.3g}, fault min {fault_min:.3g}", good_max, fault_min)
        return SelfTestReport(True, "ok", good_max, fault_min)

    def self_test(self) -> bool:
        """True when outputs are finite, one per window, and every known-good window scores
        below the threshold while every known-fault window scores above it."""
        report = self.check()
        if not report.ok:
            log.warning("model %s failed its self-test: %s", self.path, report.reason)
        return report.ok


class BatchScorer:
    """Many devices, one session: ``await score(window)`` calls made in the same
    event-loop turn are scored in one ``session.run``.

    ``model`` may be replaced (OTA) between batches.
    """

    def __init__(self, model: AnomalyModel, *, max_batch: int = 4096) -> None:
        self.model = model
        self.max_batch = max_batch
        self._pending: list[tuple[np.ndarray, asyncio.Future[tuple[float, float]]]] = []
        self._scheduled = False
        self.batches = 0
        self.windows = 0

    async def score(self, window: np.ndarray) -> tuple[float, float]:
        """``(score, latency_ms)``; the latency is that of the whole batch's run."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[float, float]] = loop.create_future()
        self._pending.append((np.asarray(window, dtype=np.float32), fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self.max_batch):
            chunk = pending[start:start + self.max_batch]
            t0 = time.perf_counter()
            try:
                scores = self.model.score_batch(np.stack([w for w, _ in chunk]))
                latency = (time.perf_counter() - t0) * 1000.0
            except Exception as exc:  # noqa: BLE001 - hand the failure to every waiter
                for _, fut in chunk:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.windows += len(chunk)
            for (_, fut), value in zip(chunk, scores, strict=False):
                if not fut.done():
                    fut.set_result((float(value), latency))


__all__ = ["BACKENDS", "CHANNELS", "DEFAULT_MODEL", "WINDOW", "AnomalyModel", "BatchScorer", "ModelError", "file_sha256"]
