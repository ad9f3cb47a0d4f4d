"""The numpy inference backend runs the agent's ONNX model as ONNX Runtime does, its
self-test still catches broken models, and the agent picks it without ONNX Runtime."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent_stub.inference import DEFAULT_MODEL, AnomalyModel, ModelError, self_test_windows
from agent_stub.model import build_model
from agent_stub.onnx_numpy import NumpySession, OnnxFormatError, UnsupportedModel
from agent_stub.sensors import SensorStream, windows

ROOT = Path(__file__).resolve().parents[2]


def sensor_windows(seed: int = 7, samples: int = 8000) -> np.ndarray:
    """Windows of a simulated stream with faults, plus the self-test's known-good and known-fault ones."""
    values, labels = SensorStream(seed, fault_rate=0.01).take(samples)
    stream, _ = windows(values, labels)
    good, fault = self_test_windows()
    return np.concatenate([stream, good, fault]).astype(np.float32)


def onnxruntime_scores(path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def test_the_numpy_backend_scores_every_window_as_onnxruntime_does() -> None:
    batch = sensor_windows()
    expected = onnxruntime_scores(DEFAULT_MODEL, batch)
    got = NumpySession(DEFAULT_MODEL).run(None, {"window": batch})[0]
    assert got.dtype == np.float32 and got.shape == expected.shape == (len(batch),)
    assert expected.max() > 100 * expected.min()  # the windows span normal and faulty scores
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_one_window_at_a_time_scores_as_a_batch_of_one_in_onnxruntime() -> None:
    numpy_model, ort_model = AnomalyModel(backend="numpy"), AnomalyModel(backend="onnxruntime")
    assert (numpy_model.backend, ort_model.backend) == ("numpy", "onnxruntime")
    for window in sensor_windows(seed=11, samples=400):
        assert numpy_model.score(window) == pytest.approx(ort_model.score(window), rel=1e-5, abs=1e-5)


# "shape" outputs the nine squared whitened deviations themselves, before the mean: each one
# carries the float32 cancellation of (feature - mu) that both runtimes have (~1e-5 relative
# against float64 for either), so two float32 runtimes agree to 1e-4 there, not 1e-5.
@pytest.mark.parametrize(("variant", "tolerance"), [("nan", 1e-5), ("shape", 1e-4)])
def test_a_broken_model_variant_gives_the_same_outputs_in_both_backends(tmp_path: Path, variant: str,
                                                                         tolerance: float) -> None:
    path = tmp_path / f"{variant}.onnx"
    path.write_bytes(build_model.build_onnx(build_model.train()[0], broken=variant))
    batch = sensor_windows(samples=600)
    expected = onnxruntime_scores(path, batch)
    got = NumpySession(path).run(None, {"window": batch})[0]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance, equal_nan=True)


def test_the_shipped_model_passes_its_self_test_on_the_numpy_backend() -> None:
    model = AnomalyModel(backend="numpy")
    report = model.check()
    assert report.ok, report.reason
    assert report.good_max < model.threshold < report.fault_min


@pytest.mark.parametrize(("variant", "reason"), [("nan", "not finite"), ("shape", "output shape")])
def test_the_numpy_backend_self_test_catches_a_broken_model(tmp_path: Path, variant: str, reason: str) -> None:
    build_model.build(tmp_path / f"{variant}.onnx", broken=variant, evaluate_model=False)
    model = AnomalyModel(tmp_path / f"{variant}.onnx", backend="numpy")
    report = model.check()
    assert not report.ok and reason in report.reason
    assert not model.self_test()


def test_a_model_whose_ordering_is_wrong_fails_the_numpy_self_test(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(DEFAULT_MODEL.read_bytes())
    model = AnomalyModel(tmp_path / "m.onnx", threshold=1e9, backend="numpy")  # no fault scores above it
    assert not model.self_test() and "not ordered" in model.check().reason


@pytest.mark.parametrize("content", [b"not a model", b"", b"\x08\x08" + b"\xff" * 12, DEFAULT_MODEL.read_bytes()[:700]])
def test_a_file_that_is_not_an_onnx_model_does_not_load(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "m.onnx").write_bytes(content)
    with pytest.raises(OnnxFormatError):
        NumpySession(tmp_path / "m.onnx")
    for backend in ("numpy", "auto"):
        with pytest.raises(ModelError):
            AnomalyModel(tmp_path / "m.onnx", threshold=1.0, backend=backend)


def model_with_an_operator_numpy_lacks(path: Path) -> Path:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Abs", ["window"], ["a"]),
         helper.make_node("ReduceMean", ["a"], ["m"], axes=[1, 2], keepdims=0)],
        "abs_mean", [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["N", 16, 3])],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_auto_falls_back_to_onnxruntime_for_an_operator_the_numpy_backend_lacks(tmp_path: Path) -> None:
    path = model_with_an_operator_numpy_lacks(tmp_path / "abs.onnx")
    with pytest.raises(UnsupportedModel, match="Abs"):
        NumpySession(path)
    with pytest.raises(ModelError, match="numpy backend cannot run it"):
        AnomalyModel(path, threshold=1.0, backend="numpy")
    model = AnomalyModel(path, threshold=1.0, backend="auto")
    assert model.backend == "onnxruntime"
    batch = -np.ones((2, 16, 3), dtype=np.float32)
    np.testing.assert_allclose(model.score_batch(batch), [1.0, 1.0])


def test_the_backend_comes_from_the_environment_when_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_INFERENCE_BACKEND", "onnxruntime")
    assert AnomalyModel().backend == "onnxruntime"
    monkeypatch.setenv("AGENT_INFERENCE_BACKEND", "numpy")
    assert AnomalyModel().backend == "numpy"
    monkeypatch.setenv("AGENT_INFERENCE_BACKEND", "tensorflow")
    with pytest.raises(ModelError, match="unknown inference backend"):
        AnomalyModel()


def test_without_onnxruntime_installed_the_agent_scores_self_tests_and_reports_no_gpu(tmp_path: Path) -> None:
    abs_model = model_with_an_operator_numpy_lacks(tmp_path / "abs.onnx")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["onnxruntime"] = None  # as if it were not installed: importing it raises ImportError
        import numpy as np
        from agent_stub.client import capabilities
        from agent_stub.inference import AnomalyModel, ModelError
        model = AnomalyModel()
        assert model.backend == "numpy", model.backend
        assert model.self_test()
        assert model.score(np.zeros((16, 3), np.float32)) > model.threshold  # a dead sensor is an anomaly
        assert capabilities()["accelerator"] == "none"
        for backend in ("onnxruntime", "auto"):
            try:
                AnomalyModel({str(abs_model)!r}, threshold=1.0, backend=backend)
            except ModelError as exc:
                assert "onnxruntime" in str(exc), exc
            else:
                raise AssertionError("an Abs model loaded without onnxruntime")
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_loading_the_shipped_model_does_not_import_onnxruntime() -> None:
    script = ("import sys\nfrom agent_stub.client import Agent, capabilities\n"
              "from agent_stub.inference import AnomalyModel\n"
              "AnomalyModel().self_test(); capabilities()\nprint('onnxruntime' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
