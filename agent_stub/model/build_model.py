"""Build the shipped anomaly model, reproducibly: ``python -m agent_stub build-model``.

Owns the model's definition and training.  The detector is a standardised Mahalanobis
distance over nine window features — per channel (vibration, temperature, current) the
mean, the standard deviation and the trend (last quarter minus first quarter) over a
16-sample window — fitted in numpy on fault-free
synthetic streams from several simulated devices.  The full covariance is what makes it
useful: current, vibration and temperature move together with the load, so a channel
that leaves that relation (a bearing, a cooling failure, a current without load) is far
from the normal cloud even when each value alone looks plausible.  The trend lets it
tell a temperature that is still catching up with a load change (it moves toward the
load) from one that is too high for the load.

The ONNX graph computes the features itself, so the agent feeds raw windows
``float32[N, 16, 3]`` and gets ``score float32[N]`` (mean squared whitened distance; about
1 for normal windows).  The threshold is the 99.9th percentile of the training scores.

Reproducibility: fixed seeds, a platform-independent sample generator, parameters rounded
to 6 significant digits (so BLAS summation order cannot change a byte) and no timestamps
in the file.  ``--broken nan|shape`` writes a deliberately broken variant for rollback
tests (never shipped).

This is a build-time script: it imports ``onnx``, which the agent runtime never needs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from agent_stub.sensors import CHANNELS, WINDOW, SensorStream, windows

MODEL_NAME = "anomaly"
MODEL_VERSION = "1.0.0"
OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; every onnxruntime since 1.11 reads it
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / f"{MODEL_NAME}-{MODEL_VERSION}.onnx"

TRAIN_SEEDS = range(1000, 1008)
TRAIN_SAMPLES = 12_000
HOLDOUT_SEEDS = range(5000, 5006)
HOLDOUT_SAMPLES = 12_000
HOLDOUT_FAULT_RATE = 0.004
THRESHOLD_QUANTILE = 0.999
EPS = 1e-6
QUARTER = WINDOW // 4  # the trend feature compares the last quarter of a window with the first


def _sig(values: np.ndarray, digits: int = 6) -> np.ndarray:
    """Round to ``digits`` significant digits, element-wise, through decimal text."""
    flat = [float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=np.float64).ravel()]
    return np.array(flat, dtype=np.float32).reshape(np.shape(values))


def features(batch: np.ndarray) -> np.ndarray:
    """The model's features in numpy, exactly as the ONNX graph computes them."""
    batch = batch.astype(np.float32)
    mean = batch.mean(axis=1)
    std = np.sqrt(((batch - mean[:, None, :]) ** 2).mean(axis=1) + np.float32(EPS))
    trend = batch[:, -QUARTER:, :].mean(axis=1) - batch[:, :QUARTER, :].mean(axis=1)
    return np.concatenate([mean, std, trend], axis=1)


def fit(train: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and whitening matrix of the features of ``train`` windows."""
    f = features(train).astype(np.float64)
    mu = f.mean(axis=0)
    cov = np.cov(f - mu, rowvar=False) + np.eye(f.shape[1]) * 1e-9
    # Whitening W with W Wᵀ = Σ⁻¹ (Cholesky of the inverse): ||(x-μ)W||² is Mahalanobis².
    w = np.linalg.cholesky(np.linalg.inv(cov))
    return {"mu": _sig(mu), "w": _sig(w)}


def score_numpy(params: dict[str, np.ndarray], batch: np.ndarray) -> np.ndarray:
    """Reference implementation of the ONNX graph's output."""
    z = (features(batch) - params["mu"]) @ params["w"]
    return (z * z).mean(axis=1)


def _stream(seeds: range, samples: int, fault_rate: float) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for seed in seeds:
        values, labels = SensorStream(seed, fault_rate=fault_rate).take(samples)
        x, y = windows(values, labels)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def evaluate(params: dict[str, np.ndarray], threshold: float) -> dict[str, float]:
    """Quality on held-out streams (other seeds, faults injected).

    Window level: a window is faulty when at least half its samples are in a fault
    episode and clean when none are; windows partly (< 50 %) in an episode are left out of
    precision/recall (flagging them early is right, missing them is forgivable).  Episode
    recall: the share of fault episodes with at least one flagged window overlapping them.
    """
    x, frac = _stream(HOLDOUT_SEEDS, HOLDOUT_SAMPLES, HOLDOUT_FAULT_RATE)
    flagged = score_numpy(params, x) > threshold
    pos, neg = frac >= 0.5, frac == 0
    tp = int((flagged & pos).sum())
    fp = int((flagged & neg).sum())
    fn = int((~flagged & pos).sum())
    episodes = caught = 0
    for seed in HOLDOUT_SEEDS:
        values, labels = SensorStream(seed, fault_rate=HOLDOUT_FAULT_RATE).take(HOLDOUT_SAMPLES)
        xs, _ = windows(values, labels, stride=1)
        hit = score_numpy(params, xs) > threshold  # hit[i]: window starting at sample i
        k = 0
        while k < len(labels):
            if labels[k] is None:
                k += 1
                continue
            end = k
            while end < len(labels) and labels[end] is not None:
                end += 1
            episodes += 1
            caught += bool(hit[max(0, k - WINDOW + 1):min(len(hit), end)].any())
            k = end
    return {
        "window_precision": round(tp / max(1, tp + fp), 4),
        "window_recall": round(tp / max(1, tp + fn), 4),
        "clean_window_false_positive_rate": round(fp / max(1, int(neg.sum())), 5),
        "episode_recall": round(caught / max(1, episodes), 4),
        "episodes": episodes,
        "holdout_windows": len(frac),
    }


def build_onnx(params: dict[str, np.ndarray], *, broken: str | None = None) -> bytes:
    """Serialise the detector as an ONNX model (``broken`` = ``nan`` | ``shape``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n_feat = params["mu"].shape[0]
    inits = [
        numpy_helper.from_array(params["mu"].astype(np.float32), "mu"),
        numpy_helper.from_array(params["w"].astype(np.float32), "w"),
        numpy_helper.from_array(np.array(EPS, dtype=np.float32), "eps"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "head_start"),
        numpy_helper.from_array(np.array([QUARTER], dtype=np.int64), "head_end"),
        numpy_helper.from_array(np.array([WINDOW - QUARTER], dtype=np.int64), "tail_start"),
        numpy_helper.from_array(np.array([WINDOW], dtype=np.int64), "tail_end"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "time_axis"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["window"], ["mean3"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["window", "mean3"], ["centered"]),
        helper.make_node("Mul", ["centered", "centered"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[1], keepdims=0),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("ReduceMean", ["window"], ["mean"], axes=[1], keepdims=0),
        helper.make_node("Slice", ["window", "head_start", "head_end", "time_axis"], ["head"]),
        helper.make_node("Slice", ["window", "tail_start", "tail_end", "time_axis"], ["tail"]),
        helper.make_node("ReduceMean", ["head"], ["head_mean"], axes=[1], keepdims=0),
        helper.make_node("ReduceMean", ["tail"], ["tail_mean"], axes=[1], keepdims=0),
        helper.make_node("Sub", ["tail_mean", "head_mean"], ["trend"]),
        helper.make_node("Concat", ["mean", "std", "trend"], ["feat"], axis=1),
        helper.make_node("Sub", ["feat", "mu"], ["dev"]),
        helper.make_node("MatMul", ["dev", "w"], ["z"]),
        helper.make_node("Mul", ["z", "z"], ["z2"]),
    ]
    out_shape: list[Any] = ["N"]
    if broken is None:
        nodes.append(helper.make_node("ReduceMean", ["z2"], ["score"], axes=[1], keepdims=0))
    elif broken == "nan":
        inits.append(numpy_helper.from_array(np.array(np.nan, dtype=np.float32), "nan"))
        nodes.append(helper.make_node("ReduceMean", ["z2"], ["raw_score"], axes=[1], keepdims=0))
        nodes.append(helper.make_node("Mul", ["raw_score", "nan"], ["score"]))
    elif broken == "shape":
        nodes.append(helper.make_node("Identity", ["z2"], ["score"]))
        out_shape = ["N", n_feat]
    else:
        raise ValueError(f"unknown broken variant {broken!r} (nan or shape)")
    graph = helper.make_graph(
        nodes, f"{MODEL_NAME}_{MODEL_VERSION}",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["N", WINDOW, len(CHANNELS)])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="agent_stub.build_model", producer_version=MODEL_VERSION)
    model.ir_version = IR_VERSION
    model.doc_string = "Mahalanobis anomaly score over per-channel window mean/std (see build_model.py)"
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def train() -> tuple[dict[str, np.ndarray], float]:
    """Fit on fault-free streams; the threshold is a high quantile of training scores."""
    x, _ = _stream(TRAIN_SEEDS, TRAIN_SAMPLES, 0.0)
    params = fit(x)
    scores = score_numpy(params, x)
    threshold = float(f"{np.quantile(scores, THRESHOLD_QUANTILE):.6g}")
    return params, threshold


def build(out: Path = DEFAULT_OUT, *, broken: str | None = None, evaluate_model: bool = True) -> dict[str, Any]:
    """Train, write ``out`` and its ``.json`` sidecar; returns the sidecar."""
    params, threshold = train()
    data = build_onnx(params, broken=broken)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    sidecar: dict[str, Any] = {
        "name": MODEL_NAME,
        "version": MODEL_VERSION if broken is None else f"{MODEL_VERSION}-broken-{broken}",
        "input": {"name": "window", "shape": [None, WINDOW, len(CHANNELS)], "channels": list(CHANNELS),
                  "dtype": "float32"},
        "output": {"name": "score", "shape": [None]},
        "threshold": threshold,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "opset": OPSET,
        "training": {"seeds": [TRAIN_SEEDS.start, TRAIN_SEEDS.stop], "samples_per_seed": TRAIN_SAMPLES,
                     "threshold_quantile": THRESHOLD_QUANTILE},
    }
    if evaluate_model:
        sidecar["holdout"] = evaluate(params, threshold)
    out.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return sidecar


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (also ``python -m agent_stub build-model``)."""
    parser = argparse.ArgumentParser(prog="build-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="ONNX file to write (default: shipped path)")
    parser.add_argument("--broken", choices=["nan", "shape"],
                        help="write a deliberately broken variant (for rollback tests; never ship it)")
    args = parser.parse_args(argv)
    if args.broken and args.out.resolve() == DEFAULT_OUT:
        parser.error("--broken needs an explicit --out; it must not overwrite the shipped model")
    sidecar = build(args.out, broken=args.broken)
    print(json.dumps(sidecar, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
