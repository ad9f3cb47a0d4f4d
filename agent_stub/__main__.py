"""Command line: ``python -m agent_stub run|simulate|build-model``.

Owns argument parsing, logging setup, signal handling (SIGTERM/SIGINT stop the agent
cleanly: close 1000, outbox flushed) and turning configuration mistakes into one clear
line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

EXIT_USAGE = 64


def _server_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a ws:// or wss:// URL (e.g. wss://console.example/ws/agent/v1/)")
    return value


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agent_stub", description="Edge fleet device agent (protocol v1).")
    parser.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="default: INFO for run, WARNING for simulate")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one device agent")
    run.add_argument("--server", required=True, type=_server_url, help="wss://HOST/ws/agent/v1/")
    run.add_argument("--state-dir", required=True, type=Path, help="key, identity, outbox and config live here")
    run.add_argument("--enroll-token", help="enrollment token (first run only)")
    run.add_argument("--uid", help="device uid to enroll with (default: generated and kept in the state dir)")
    run.add_argument("--tpm", metavar="SPEC", help="use a TPM: /dev/tpmrm0 or swtpm:host=H,port=P")
    run.add_argument("--inference", choices=["auto", "numpy", "onnxruntime"],
                     help="inference backend (default: $AGENT_INFERENCE_BACKEND or auto: numpy when it runs the "
                          "model, else onnxruntime)")

    sim = sub.add_parser("simulate", help="run many simulated devices in this process")
    sim.add_argument("--server", required=True, type=_server_url)
    sim.add_argument("--devices", required=True, type=_positive_int)
    sim.add_argument("--enroll-token", help="token with enough uses for every new device")
    sim.add_argument("--state-dir", type=Path, default=Path("sim-state"),
                     help="per-device state under DIR/<uid>/ (default ./sim-state)")
    sim.add_argument("--memory", action="store_true", help="keep keys and outboxes in memory (benchmarks)")
    sim.add_argument("--rate", type=_positive_float, default=5.0, help="points per second per device (default 5)")
    sim.add_argument("--batch", type=_positive_int, default=100, help="points per telemetry frame (default 100)")
    sim.add_argument("--duration", type=_positive_float, help="stop after this many seconds")
    sim.add_argument("--uid-prefix", default="sim-", help="device uids are PREFIX00000, PREFIX00001, …")
    sim.add_argument("--ramp", type=float, help="spread connects over this many seconds (default devices/200)")
    sim.add_argument("--fault-rate", type=float, default=0.002, help="chance per sample that a fault starts")

    build = sub.add_parser("build-model", help="rebuild the shipped anomaly model (reproducible)")
    build.add_argument("--out", type=Path, help="ONNX file to write (default: the shipped path)")
    build.add_argument("--broken", choices=["nan", "shape"], help="write a broken variant for rollback tests")
    return parser


def _install_signals(stop: Callable[[], object]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


def _malloc_tuning() -> Callable[[], None]:
    """glibc malloc for a small long-running process: at most two arenas (instead of eight per
    core for the few helper threads), and a ``trim`` that hands freed heap pages back to the
    kernel (start-up, handshakes and OTA leave freed memory behind). A no-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0) and None


async def _trim_periodically(trim: Callable[[], None], every_s: float = 30.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        trim()


async def _run(args: argparse.Namespace) -> int:
    from agent_stub.client import Agent, AgentStop
    from agent_stub.inference import BACKEND_ENV
    from agent_stub.keys import KeyFileError

    trim = _malloc_tuning()
    if args.inference:
        os.environ[BACKEND_ENV] = args.inference  # OTA-loaded models use it too
    try:
        agent = Agent(args.server, args.state_dir, enroll_token=args.enroll_token, device_uid=args.uid,
                      tpm_spec=args.tpm)
    except AgentStop as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (KeyFileError, OSError) as exc:
        print(f"error: cannot use state directory {args.state_dir}: {exc}", file=sys.stderr)
        return 3
    _install_signals(agent.stop)
    logging.getLogger(__name__).info("device %s, state in %s, inference backend %s", agent.device_uid,
                                     args.state_dir, agent.model.backend)
    trim()
    trimmer = asyncio.create_task(_trim_periodically(trim))
    try:
        code = await agent.run()
    finally:
        trimmer.cancel()
    if agent.exit_message:
        print(f"agent stopped: {agent.exit_message}", file=sys.stderr)
    return code


async def _simulate(args: argparse.Namespace) -> int:
    from agent_stub.simulate import SimOptions, simulate

    stop = asyncio.Event()
    _install_signals(stop.set)
    opts = SimOptions(server_url=args.server, devices=args.devices, rate=args.rate, batch=args.batch,
                      enroll_token=args.enroll_token, state_dir=None if args.memory else args.state_dir,
                      duration=args.duration, uid_prefix=args.uid_prefix, ramp_s=args.ramp,
                      fault_rate=args.fault_rate)
    stats = await simulate(opts, stop=stop)
    print(f"done: {stats.welcomed} sessions welcomed, {stats.acked_points} points acked, "
          f"{stats.errors} error frames, {stats.connect_failures} connect failures, closes {dict(stats.closes)}",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    level = args.log_level or ("WARNING" if args.command == "simulate" else "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "build-model":
        from agent_stub.model import build_model

        argv_build = [] if args.out is None else ["--out", str(args.out)]
        if args.broken:
            argv_build += ["--broken", args.broken]
        try:
            return build_model.main(argv_build)
        except ImportError as exc:
            print(f"error: building the model needs the 'onnx' package: {exc}", file=sys.stderr)
            return 3
    runner = _run if args.command == "run" else _simulate
    try:
        return asyncio.run(runner(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
