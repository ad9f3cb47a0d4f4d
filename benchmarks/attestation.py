"""Attestation benchmark: TPM quote verifications per second per worker process.

    .venv/bin/python -m benchmarks.attestation [--seconds 10] [--workers N]

Uses the real quotes captured from swtpm through the agent (`security/tpm/bench_quotes.json`,
RSA-2048 and ECC P-256 AKs; regenerate with `tests/tpm/capture_bench_quotes.py`) and the real
verifier (`security.tpm.verify.verify_quote`: AK/EK parsing, signature, qualifying-data binding
to the device key, PCR digest) — the CPU work `security.attestation.evidence_appraise` does per
evidence frame before its database writes. Every sample is checked to verify first. Runs
--workers processes at once (default: one per core), each verifying for --seconds, "warm" (the
parsed-AK cache of a long-lived worker) and "cold" (cache cleared before each verification),
and reports the per-worker rate (wall clock, and per CPU-second of the worker, which is what a
worker with a core to itself would do: the same figure on a quiet machine) and the total. No database, no network.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import cpu_seconds, result, row


def _worker(alg: str, seconds: float, cold: bool, out: multiprocessing.Queue) -> None:
    from security.tpm import bench

    cpu0 = cpu_seconds()
    rate = bench.run(alg, seconds, cold)
    out.put((rate, cpu_seconds() - cpu0))


def measure(alg: str, seconds: float, cold: bool, workers: int) -> tuple[list[float], float]:
    """Per-worker rates and the mean CPU share of a worker (1.0 = one core)."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(alg, seconds, cold, out), daemon=True) for _ in range(workers)]
    try:
        for p in procs:
            p.start()
        values = [out.get(timeout=seconds + 60) for _ in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(5)
    return [v[0] for v in values], sum(v[1] for v in values) / len(values) / seconds


def run(*, seconds: float = 10.0, workers: int | None = None) -> dict:
    from security.tpm import bench

    workers = workers or os.cpu_count() or 1
    samples = bench._load()
    counts = {alg: sum(1 for q in samples if q["alg"] == alg) for alg in ("rsa", "ecc")}
    rows, details = [], {"workers": workers, "seconds": seconds, "captured_quotes": counts}
    for alg, label in (("rsa", "RSA-2048 AK"), ("ecc", "ECC P-256 AK")):
        for cold in (False, True):
            rates, cpu_share = measure(alg, seconds, cold, workers)
            per_worker = sum(rates) / len(rates)
            kind = "cold AK cache" if cold else "warm"
            per_cpu_s = per_worker / max(cpu_share, 1e-9)  # what a worker does with a whole core
            rows.append(row(f"{label}, {kind}: per worker (wall)", per_worker, "verif./s"))
            rows.append(row(f"{label}, {kind}: per worker-core (per CPU-second)", per_cpu_s, "verif./s", "≥ 1,000/s",
                            per_cpu_s >= 1000))
            rows.append(row(f"{label}, {kind}: {workers} workers total", sum(rates), "verif./s"))
            details[f"{alg}_{'cold' if cold else 'warm'}_worker_cpu_share"] = round(cpu_share, 2)
    return result("attestation", rows, **details)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    from benchmarks.run import print_results

    print_results([run(seconds=args.seconds, workers=args.workers)])


if __name__ == "__main__":
    main()
