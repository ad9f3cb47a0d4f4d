"""The shipped anomaly model: reproducible build, quality, self-test, batching."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from agent_stub.inference import DEFAULT_MODEL, AnomalyModel, BatchScorer, self_test_windows
from agent_stub.model import build_model


@pytest.fixture(scope="module")
def trained() -> tuple[dict[str, np.ndarray], float]:
    return build_model.train()


def test_rebuilding_the_model_gives_identical_bytes(tmp_path: Path) -> None:
    sidecar = build_model.build(tmp_path / "m.onnx", evaluate_model=False)
    assert (tmp_path / "m.onnx").read_bytes() == DEFAULT_MODEL.read_bytes()
    shipped = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    assert sidecar["sha256"] == shipped["sha256"] == hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest()
    assert sidecar["threshold"] == shipped["threshold"]


def test_shipped_model_is_small_and_described_by_its_sidecar() -> None:
    assert DEFAULT_MODEL.stat().st_size < 200 * 1024
    meta = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    assert meta["version"] == "1.0.0" and meta["input"]["shape"] == [None, 16, 3]


def test_model_flags_injected_faults_on_held_out_streams(trained: tuple[dict[str, np.ndarray], float]) -> None:
    # Held-out seeds (never trained on) with faults injected. Thresholds stated here:
    # window precision and recall >= 0.95, every fault episode caught at least once in
    # practice (>= 0.98), and at most 0.5 % of clean windows flagged.
    params, threshold = trained
    quality = build_model.evaluate(params, threshold)
    assert quality["window_precision"] >= 0.95, quality
    assert quality["window_recall"] >= 0.95, quality
    assert quality["episode_recall"] >= 0.98, quality
    assert quality["clean_window_false_positive_rate"] <= 0.005, quality
    assert quality["episodes"] >= 100


def test_onnx_graph_matches_the_numpy_reference(trained: tuple[dict[str, np.ndarray], float]) -> None:
    params, _ = trained
    good, fault = self_test_windows()
    batch = np.concatenate([good, fault])
    np.testing.assert_allclose(AnomalyModel().score_batch(batch), build_model.score_numpy(params, batch), rtol=1e-3)


def test_self_test_passes_for_the_good_model() -> None:
    model = AnomalyModel()
    assert model.self_test()
    assert model.score(self_test_windows()[0][0]) < model.threshold


@pytest.mark.parametrize(("variant", "reason"), [("nan", "not finite"), ("shape", "shape")])
def test_self_test_fails_for_a_broken_model(tmp_path: Path, variant: str, reason: str) -> None:
    build_model.build(tmp_path / f"{variant}.onnx", broken=variant, evaluate_model=False)
    model = AnomalyModel(tmp_path / f"{variant}.onnx")
    assert not model.self_test()
    assert reason in model.check().reason


def test_broken_variant_refuses_to_overwrite_the_shipped_model() -> None:
    with pytest.raises(SystemExit):
        build_model.main(["--broken", "nan"])


def test_a_model_without_threshold_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(DEFAULT_MODEL.read_bytes())
    with pytest.raises(Exception, match="threshold"):
        AnomalyModel(tmp_path / "m.onnx")
    assert AnomalyModel(tmp_path / "m.onnx", threshold=3.0).self_test()


def test_batch_scorer_serves_many_devices_with_one_run_per_loop_turn() -> None:
    model = AnomalyModel()
    scorer = BatchScorer(model)
    good, fault = self_test_windows()
    windows = [*good, *fault] * 20

    async def scenario() -> list[tuple[float, float]]:
        return await asyncio.gather(*(scorer.score(w) for w in windows))

    results = asyncio.run(scenario())
    assert scorer.batches == 1 and scorer.windows == len(windows)
    np.testing.assert_allclose([s for s, _ in results], model.score_batch(np.stack(windows)), rtol=1e-6)
