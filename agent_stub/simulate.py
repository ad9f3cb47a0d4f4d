"""Many simulated devices in one process, for demos and load tests.

Owns the simulator: N independent ``Agent`` objects (each with its own key, uid, seq
counter and outbox — on disk under ``state_dir/<uid>/`` by default, in memory with
``memory=True``) sharing one ONNX session through a ``BatchScorer``, connecting in a
staggered ramp so the server is not hit by N handshakes at once, and a progress line on
stderr once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from agent_stub.client import Agent, Config, Stats
from agent_stub.inference import DEFAULT_MODEL, AnomalyModel, BatchScorer

# Points one sample produces: three sensor channels, the anomaly score and the inference
# latency (system metrics are added once per frame).
POINTS_PER_SAMPLE = 5


@dataclass
class SimOptions:
    """What ``simulate`` runs; the CLI maps its options onto these fields."""

    server_url: str
    devices: int
    rate: float = 5.0  # points per second per device
    batch: int = 100  # points per telemetry frame
    enroll_token: str | None = None
    state_dir: Path | None = None  # None: everything in memory
    duration: float | None = None
    uid_prefix: str = "sim-"
    ramp_s: float | None = None  # spread connects over this many seconds (default N/200)
    fault_rate: float = 0.002
    model_path: Path = DEFAULT_MODEL
    backoff_start: float = 1.0
    backoff_cap: float = 300.0


def _progress(out: TextIO, started: float, stats: Stats, agents: list[Agent], last: list[int]) -> None:
    elapsed = time.monotonic() - started
    buffered = sum(a.outbox.buffered for a in agents)
    rate = stats.acked_points - last[0]
    last[0] = stats.acked_points
    out.write(f"\r[{elapsed:6.0f}s] connected {stats.connected}/{len(agents)}  acked points {stats.acked_points}"
              f" (+{rate}/s)  buffered {buffered} frames  errors {stats.errors}"
              f"  connect failures {stats.connect_failures}   ")
    out.flush()


def simulator_backend() -> str:
    """``AGENT_INFERENCE_BACKEND`` if set, else onnxruntime where installed: the shared session
    scores small batches about twice as fast as the numpy backend, and one process holds it."""
    import importlib.util
    import os

    from agent_stub.inference import BACKEND_ENV

    if os.environ.get(BACKEND_ENV):
        return os.environ[BACKEND_ENV]
    return "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else "auto"


async def simulate(opts: SimOptions, *, out: TextIO = sys.stderr, stop: asyncio.Event | None = None) -> Stats:
    """Run the simulation until ``duration`` passes or ``stop`` is set; returns the counters."""
    stop = stop or asyncio.Event()
    stats = Stats()
    model = AnomalyModel(opts.model_path, backend=simulator_backend())
    scorer = BatchScorer(model)
    agents: list[Agent] = []
    for i in range(opts.devices):
        uid = f"{opts.uid_prefix}{i:05d}"
        config = Config(sample_hz=opts.rate / POINTS_PER_SAMPLE, batch_points=opts.batch,
                        batch_s=max(1.0, opts.batch / max(opts.rate, 0.001) + 1.0), fault_rate=opts.fault_rate)
        agents.append(Agent(
            opts.server_url, None if opts.state_dir is None else opts.state_dir / uid,
            enroll_token=opts.enroll_token, device_uid=uid, scorer=scorer, config=config, stats=stats,
            backoff_start=opts.backoff_start, backoff_cap=opts.backoff_cap,
        ))
    ramp = opts.ramp_s if opts.ramp_s is not None else opts.devices / 200.0
    step = ramp / max(1, opts.devices)

    async def start(i: int, agent: Agent) -> int:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), i * step)
        if stop.is_set():
            agent.outbox.close()
            return 0
        return await agent.run()

    started = time.monotonic()
    tasks = [asyncio.create_task(start(i, a)) for i, a in enumerate(agents)]
    last = [0]
    deadline = started + opts.duration if opts.duration else None
    try:
        while not stop.is_set() and not all(t.done() for t in tasks):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            _progress(out, started, stats, agents, last)
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        stop.set()
        for agent in agents:
            agent.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        _progress(out, started, stats, agents, last)
        out.write("\n")
    return stats
