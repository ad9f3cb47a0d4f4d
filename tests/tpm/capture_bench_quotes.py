"""Capture real swtpm quotes into security/tpm/bench_quotes.json for security/tpm/bench.py.

Usage (with a running swtpm):  python -m tests.tpm.capture_bench_quotes swtpm:host=127.0.0.1,port=2321 STATE_DIR
Lives with the tests because it needs the agent side (agent_stub.tpm), which
security/ must not import.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

from agent_stub.tpm import Tpm
from security.tpm.verify import make_challenge_qualifying_data

OUT = Path(__file__).resolve().parents[2] / "security" / "tpm" / "bench_quotes.json"


def capture(spec: str, state_dir: str, per_key: int = 16) -> dict:
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    quotes = []
    for alg, handle in (("rsa", 0x81008000), ("ecc", 0x81008001)):
        t = Tpm(spec, ek_alg=alg, ak_alg=alg, ak_handle=handle)
        t.ensure_keys(os.path.join(state_dir, alg))
        for _ in range(per_key):
            nonce, device = os.urandom(32), os.urandom(32)
            attest, sig, pcrs = t.quote(make_challenge_qualifying_data(nonce, device), list(range(8)))
            quotes.append(
                {
                    "alg": alg,
                    "ak_pub": b64(t.ak_public()),
                    "ek_pub": b64(t.ek_public()),
                    "nonce": b64(nonce),
                    "device_key": b64(device),
                    "attest": b64(attest),
                    "signature": b64(sig),
                    "pcrs": pcrs,
                }
            )
    return {"source": "swtpm 0.7 + tpm2-tools 5.4", "quotes": quotes}


if __name__ == "__main__":
    OUT.write_text(json.dumps(capture(sys.argv[1], sys.argv[2]), indent=1) + "\n")
    print(f"wrote {OUT}")
