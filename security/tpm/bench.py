"""Benchmark: quote verifications per second on one core, using real swtpm quotes.

Run:  python -m security.tpm.bench [seconds]

The quotes in ``bench_quotes.json`` were produced by a real (software) TPM
through the agent (RSA-2048/RSASSA and ECC P-256/ECDSA AKs; regenerate with
``tests/tpm/capture_bench_quotes.py``). "warm" is the steady state of a worker
(the parsed AK is cached); "cold" clears that cache before every verification.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import verify

DATA = Path(__file__).with_name("bench_quotes.json")


def _load() -> list[dict[str, Any]]:
    d = base64.b64decode
    out = []
    for q in json.loads(DATA.read_text())["quotes"]:
        out.append(
            {
                "alg": q["alg"],
                "kwargs": {
                    "ak_public": d(q["ak_pub"]),
                    "ek_public": d(q["ek_pub"]),
                    "attest": d(q["attest"]),
                    "signature": d(q["signature"]),
                    "nonce": d(q["nonce"]),
                    "device_public_key": d(q["device_key"]),
                    "requested_pcrs": {"sha256": list(range(8))},
                    "reported_pcrs": q["pcrs"],
                },
            }
        )
    return out


def run(alg: str, seconds: float, cold: bool) -> float:
    """Verifications per second for quotes of AK algorithm ``alg``."""
    quotes = [q["kwargs"] for q in _load() if q["alg"] == alg]
    for q in quotes:  # sanity: every sample must verify, or the figure is meaningless
        res = verify.verify_quote(**q)
        if not res.ok:
            raise SystemExit(f"sample quote does not verify: {res.failed}")
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for q in quotes:
            if cold:
                verify._ak_material.cache_clear()
            verify.verify_quote(**q)
        n += len(quotes)
    return n / (time.perf_counter() - start)


def main(argv: list[str]) -> None:
    seconds = float(argv[1]) if len(argv) > 1 else 2.0
    for alg, label in (("rsa", "RSA-2048 AK"), ("ecc", "ECC P-256 AK")):
        for cold in (False, True):
            rate = run(alg, seconds, cold)
            print(f"{label:13s} {'cold' if cold else 'warm'}: {rate:8.0f} verifications/s")


if __name__ == "__main__":
    main(sys.argv)
