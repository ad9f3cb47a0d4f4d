"""The benchmark runner (`make bench`): runs the benchmarks, prints one table, updates docs.

    .venv/bin/python -m benchmarks.run [--quick] [--only ingest,connections,rollout,rollout_agents,
                                       attestation,queries,footprint]
                                       [--no-docs] [--json results.json]

Each benchmark runs in its own child process (its own process group), with its own scratch
database on DATABASE_URL's server and its own console server / client processes where it needs
them; the child is bounded in time (SIGTERM, then SIGKILL of its whole group) and on SIGINT or
SIGTERM the runner stops the running child the same way. Loopback only.

--quick runs every benchmark at a small size with short windows, to check the code paths end to
end: its figures are not the targets' measurements. The table and the machine's facts replace
the generated section of docs/benchmarks.md (between `<!-- bench:begin -->` and
`<!-- bench:end -->`); --no-docs leaves the file alone.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import ROOT

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# name: (module, full parameters, --quick parameters, time limit in seconds full / quick)
BENCHMARKS: dict[str, tuple[str, dict, dict, tuple[int, int]]] = {
    "ingest": ("benchmarks.ingest_lean",
               {"devices": 1000, "rate": 105, "batch": 500, "clients": 2, "seconds": 60, "warmup": 15},
               {"devices": 40, "rate": 20, "batch": 100, "clients": 1, "seconds": 5, "warmup": 3, "copy_rows": 20_000},
               (900, 240)),
    "ingest_stubs": ("benchmarks.ingest_e2e",
               {"devices": 1000, "rate": 100, "batch": 500, "seconds": 60, "warmup": 15},
               {"devices": 40, "rate": 20, "batch": 100, "seconds": 5, "warmup": 3, "copy_rows": 20_000},
               (900, 240)),
    "connections": ("benchmarks.connections",
                    {"connections": 10_000, "clients": 4, "hold": 60, "heartbeat": 30},
                    {"connections": 300, "clients": 2, "hold": 8, "heartbeat": 3},
                    (900, 240)),
    "rollout": ("benchmarks.rollout",
                {"devices": 10_000},
                {"devices": 500, "tick": 1.0, "workers": 4, "timeout": 120},
                (1800, 300)),
    "rollout_agents": ("benchmarks.rollout_agents",
                       {"devices": 10_000, "clients": 4},
                       {"devices": 300, "clients": 2, "soak": 2, "timeout": 240, "gate_timeout": 90},
                       (3600, 600)),
    "attestation": ("benchmarks.attestation",
                    {"seconds": 10},
                    {"seconds": 1},
                    (300, 120)),
    "queries": ("benchmarks.queries",
                {"rows": 50_000_000, "devices": 10_000, "runs": 50},
                {"rows": 300_000, "devices": 10_000, "runs": 50},
                (7200, 600)),
    "footprint": ("benchmarks.footprint",
                  {"seconds": 60},
                  {"seconds": 8},
                  (300, 180)),
}

# How a benchmark is named in the table when its module's own name would be ambiguous.
LABELS = {"rollout": "rollout (direct service calls)", "ingest_stubs": "ingest (full agent stubs in one process)"}

_current: subprocess.Popen | None = None


# --- machine facts ----------------------------------------------------------------------------


def machine_facts() -> dict[str, str]:
    import psutil

    facts: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    facts["CPU"] = model.group(1).strip() if model else platform.processor() or "unknown"
    facts["cores"] = f"{os.cpu_count()} logical ({psutil.cpu_count(logical=False) or '?'} physical)"
    facts["memory"] = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    facts["kernel"] = f"{platform.system()} {platform.release()}"
    with contextlib.suppress(OSError):
        os_release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
        facts["OS"] = os_release.get("PRETTY_NAME", "").strip('"')
    facts["Python"] = platform.python_version()
    facts["PostgreSQL"] = _postgres_version()
    facts["Redis"] = _redis_version()
    facts["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return facts


def _postgres_version() -> str:
    try:
        from benchmarks import setup_django

        setup_django()
        from django.db import connection

        with connection._nodb_cursor() as cursor:  # the server's maintenance database: ours may not exist yet
            cursor.execute("SHOW server_version")
            version = cursor.fetchone()[0]
            cursor.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'")
            ts = cursor.fetchone()
        return version + (f" (TimescaleDB {ts[0]} available)" if ts else "")
    except Exception as exc:  # noqa: BLE001 -- a fact we could not read is reported as such
        return f"unknown ({exc.__class__.__name__})"


def _redis_version() -> str:
    try:
        import redis
        from django.conf import settings

        url = os.environ.get("REDIS_URL") or getattr(settings, "REDIS_URL", "")
        client = redis.Redis.from_url(url, socket_timeout=3)
        return client.info("server")["redis_version"]
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({exc.__class__.__name__})"


# --- output -------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(results: list[dict]) -> str:
    lines = ["| benchmark | metric | value | target | met |", "|---|---|---|---|---|"]
    for res in results:
        if res.get("error"):
            lines.append(f"| {res['benchmark']} | **failed** | {res['error'][:160]} | | |")
            continue
        for r in res["rows"]:
            met = {True: "met", False: "**missed**", None: ""}[r["met"]]
            unit = f" {r['unit']}" if r["unit"] else ""
            lines.append(f"| {res['benchmark']} | {r['metric']} | {_fmt(r['value'])}{unit} | {r['target']} | {met} |")
    return "\n".join(lines)


def print_results(results: list[dict]) -> None:
    print(table(results))
    for res in results:
        details = {k: v for k, v in res.get("details", {}).items() if v not in (None, [], {})}
        if details:
            print(f"\n{res['benchmark']} details: {json.dumps(details, default=str)}")


def generated_section(results: list[dict], facts: dict[str, str], command: str, quick: bool, started: dt.datetime,
                      wall_s: float) -> str:
    mode = ("**--quick** (small sizes, short windows: checks the code paths, NOT a measurement of the targets)"
            if quick else "full")
    lines = [
        BEGIN,
        "<!-- generated by `python -m benchmarks.run`; edits between these markers are overwritten -->",
        f"### Latest runner output ({mode})", "",
        "| | |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in facts.items()],
        f"| date | {started:%Y-%m-%d %H:%M} UTC |",
        f"| command | `{command}` |",
        f"| runner wall time | {wall_s / 60:.1f} min |",
        "",
        table(results),
        "",
    ]
    for res in results:
        details = {k: v for k, v in res.get("details", {}).items() if v not in (None, [], {})}
        if details:
            lines.append(f"- {res['benchmark']}: `{json.dumps(details, default=str)}`")
    lines.append(END)
    return "\n".join(lines)


def update_doc(section: str, path: Path = DOC) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n## Runner output\n" + section + "\n"
    path.write_text(text)


# --- running the children ---------------------------------------------------------------------


def _stop_child(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the child's process group (its finally blocks drop databases and stop servers),
    then SIGKILL whatever is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group
    if proc.poll() is None:
        proc.wait(10)


def run_one(name: str, params: dict, timeout: float) -> dict:
    global _current
    with tempfile.NamedTemporaryFile("r", suffix=".json", prefix=f"bench-{name}-") as out:
        cmd = [sys.executable, "-m", "benchmarks.run", "--child", name, "--params", json.dumps(params),
               "--out", out.name]
        print(f"\n=== {name} {params} (limit {timeout}s)", flush=True)
        started = time.monotonic()
        proc = _current = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"=== {name}: time limit reached, stopping it", flush=True)
        finally:
            _stop_child(proc)
            _current = None
        elapsed = time.monotonic() - started
        text = Path(out.name).read_text()
    if proc.returncode == 0 and text:
        res = json.loads(text)
    else:
        res = {"benchmark": name, "rows": [], "details": {},
               "error": f"exit status {proc.returncode} after {elapsed:.0f}s (see the output above)"}
    res.setdefault("details", {})["wall_s"] = round(elapsed, 1)
    res["benchmark"] = LABELS.get(name, res["benchmark"])
    return res


def child(name: str, params: dict, out: str) -> None:
    def terminate(signum, frame):  # run the finally blocks: stop servers, drop scratch databases
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    from benchmarks import setup_django

    setup_django()
    module = importlib.import_module(BENCHMARKS[name][0])
    res = module.run(**params)
    Path(out).write_text(json.dumps(res, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, short windows (checks the code paths)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--set", action="append", default=[], metavar="NAME.PARAM=VALUE",
                        help="override one parameter of one benchmark, e.g. queries.rows=5000000 (repeatable; "
                             "the command line, with overrides, is recorded in the generated section)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, json.loads(args.params), args.out)
        return 0

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    def on_signal(signum, frame):
        if _current is not None:
            _stop_child(_current)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started, t0 = dt.datetime.now(dt.UTC), time.monotonic()
    facts = machine_facts()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in facts.items()), flush=True)
    results = []
    overrides: dict[str, dict] = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        bench, dot, param = key.partition(".")
        if not sep or not dot or bench not in BENCHMARKS:
            parser.error(f"--set {item!r}: expected NAME.PARAM=VALUE with NAME one of {', '.join(BENCHMARKS)}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        overrides.setdefault(bench, {})[param] = value
    for name in names:
        _, full, quick, limits = BENCHMARKS[name]
        params = {**(quick if args.quick else full), **overrides.get(name, {})}
        results.append(run_one(name, params, limits[1] if args.quick else limits[0]))
    wall = time.monotonic() - t0
    print(f"\n{'QUICK RUN (code-path check, not the targets) — ' if args.quick else ''}results:\n")
    print_results(results)
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "quick": args.quick, "results": results}, default=str, indent=1))
    if not args.no_docs:
        update_doc(generated_section(results, facts, command.strip(), args.quick, started, wall))
        print(f"\n{DOC.relative_to(ROOT)} updated (generated section)")
    return 0 if all(not r.get("error") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
