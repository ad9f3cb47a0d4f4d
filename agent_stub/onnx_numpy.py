"""A small ONNX interpreter in numpy: the agent's inference backend when ONNX Runtime is
not installed, or not wanted (it costs ~28 MB of resident memory on a device whose
model is a 1.4 KB graph scored once a second).

Owns reading an ONNX file (a minimal protobuf wire-format reader for the handful of
ONNX messages a model needs: ``ModelProto``, ``GraphProto``, ``NodeProto``,
``AttributeProto``, ``TensorProto``, ``ValueInfoProto``) and running its graph with numpy,
float32 throughout, node by node in file order (ONNX requires topological order).

Only the operators the shipped anomaly model and its test variants use are implemented
(``SUPPORTED_OPS``); a model with any other operator, another operator domain, external
or sparse tensors, or control flow raises ``UnsupportedModel`` so the caller can fall back
to ONNX Runtime.  A file that is not a well-formed ONNX model raises ``OnnxFormatError``.
Results equal ONNX Runtime's to float32 rounding (``tests/agent/test_inference_numpy.py``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class OnnxFormatError(ValueError):
    """The bytes are not a well-formed ONNX model."""


class UnsupportedModel(Exception):
    """A well-formed model this interpreter cannot run (an operator or feature it lacks)."""


# --- protobuf wire format -----------------------------------------------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise OnnxFormatError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise OnnxFormatError("varint too long")


def _signed(value: int) -> int:
    """int64 fields are varints of the two's-complement value."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """``(field number, wire type, value)`` of every field of one message, in order.

    Values: int for varints, bytes for length-delimited fields and the raw 4/8 bytes of
    fixed32/fixed64 fields."""
    out = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise OnnxFormatError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise OnnxFormatError(f"unsupported wire type {wire}")
        if pos > end:
            raise OnnxFormatError("truncated field")
        out.append((number, wire, value))
    return out


def _ints(wire: int, value: Any) -> list[int]:
    """A repeated int64 field's values from one occurrence (packed or not)."""
    if wire == 0:
        return [_signed(value)]
    if wire != 2:
        raise OnnxFormatError("bad wire type for an integer field")
    values, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        values.append(_signed(v))
    return values


def _floats(wire: int, value: Any) -> list[float]:
    """A repeated float field's values from one occurrence (packed or not)."""
    if wire == 5:
        return [struct.unpack("<f", value)[0]]
    if wire != 2 or len(value) % 4:
        raise OnnxFormatError("bad wire type for a float field")
    return list(struct.unpack(f"<{len(value) // 4}f", value))


def _text(value: Any) -> str:
    if not isinstance(value, bytes):
        raise OnnxFormatError("expected a string field")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise OnnxFormatError("a string field is not UTF-8") from None


# --- ONNX messages ---------------------------------------------------------------------------
# TensorProto.DataType -> numpy dtype (the types a model of ours can hold)
_DTYPES = {1: np.float32, 6: np.int32, 7: np.int64, 9: np.bool_, 11: np.float64}


def _tensor(buf: bytes) -> tuple[str, np.ndarray]:
    dims: list[int] = []
    data_type = 0
    name = ""
    raw: bytes | None = None
    floats: list[float] = []
    ints: list[int] = []
    doubles: list[float] = []
    for number, wire, value in _fields(buf):
        if number == 1:
            dims += _ints(wire, value)
        elif number == 2:
            data_type = value
        elif number == 4:
            floats += _floats(wire, value)
        elif number in (5, 7):  # int32_data, int64_data
            ints += _ints(wire, value)
        elif number == 8:
            name = _text(value)
        elif number == 9:
            raw = bytes(value)
        elif number == 10:
            doubles += [struct.unpack("<d", value)[0]] if wire == 1 else list(
                struct.unpack(f"<{len(value) // 8}d", value))
        elif number in (13, 14) and (number == 13 or value == 1):  # external_data / data_location EXTERNAL
            raise UnsupportedModel(f"tensor {name!r} keeps its data in an external file")
        elif number == 12:  # segment
            raise UnsupportedModel(f"tensor {name!r} is segmented")
    dtype = _DTYPES.get(data_type)
    if dtype is None:
        raise UnsupportedModel(f"tensor {name!r} has data type {data_type}")
    if raw is not None:
        array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    elif dtype is np.float32:
        array = np.array(floats, dtype=dtype)
    elif dtype is np.float64:
        array = np.array(doubles, dtype=dtype)
    else:
        array = np.array(ints, dtype=dtype)
    count = int(np.prod(dims)) if dims else 1
    if array.size != count:
        raise OnnxFormatError(f"tensor {name!r}: {array.size} values for shape {dims}")
    return name, array.reshape(dims)


def _attribute(buf: bytes) -> tuple[str, Any]:
    name = ""
    kind = 0
    f = 0.0
    i = 0
    s = b""
    ints: list[int] = []
    floats: list[float] = []
    tensor: np.ndarray | None = None
    for number, wire, value in _fields(buf):
        if number == 1:
            name = _text(value)
        elif number == 2:
            f = struct.unpack("<f", value)[0]
        elif number == 3:
            i = _signed(value)
        elif number == 4:
            s = bytes(value)
        elif number == 5:
            tensor = _tensor(value)[1]
        elif number == 6:
            raise UnsupportedModel(f"attribute {name!r} holds a subgraph (control flow)")
        elif number == 7:
            floats += _floats(wire, value)
        elif number == 8:
            ints += _ints(wire, value)
        elif number == 20:
            kind = value
    # AttributeType: FLOAT=1 INT=2 STRING=3 TENSOR=4 FLOATS=6 INTS=7
    by_kind = {1: f, 2: i, 3: s, 4: tensor, 6: floats, 7: ints}
    if kind not in by_kind:
        raise UnsupportedModel(f"attribute {name!r} has type {kind}")
    return name, by_kind[kind]


@dataclass(frozen=True, slots=True)
class Node:
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


def _node(buf: bytes) -> Node:
    inputs, outputs, attrs = [], [], {}
    op = domain = ""
    for number, _wire, value in _fields(buf):
        if number == 1:
            inputs.append(_text(value))
        elif number == 2:
            outputs.append(_text(value))
        elif number == 4:
            op = _text(value)
        elif number == 5:
            key, attr = _attribute(value)
            attrs[key] = attr
        elif number == 7:
            domain = _text(value)
    if domain not in ("", "ai.onnx"):
        raise UnsupportedModel(f"operator {domain}.{op} is not in the default ONNX domain")
    return Node(op, tuple(inputs), tuple(outputs), attrs)


@dataclass(frozen=True, slots=True)
class ValueInfo:
    name: str
    elem_type: int
    shape: tuple[int | str | None, ...] | None


def _value_info(buf: bytes) -> ValueInfo:
    name, elem_type, shape = "", 0, None
    for number, _wire, value in _fields(buf):
        if number == 1:
            name = _text(value)
        elif number == 2:  # TypeProto
            for t_number, _w, t_value in _fields(value):
                if t_number != 1:  # only tensor_type
                    raise UnsupportedModel(f"value {name!r} is not a tensor")
                for k, _w2, v in _fields(t_value):
                    if k == 1:
                        elem_type = v
                    elif k == 2:
                        dims: list[int | str | None] = []
                        for _d, _w3, dim in _fields(v):
                            entry: int | str | None = None
                            for dk, _w4, dv in _fields(dim):
                                entry = _signed(dv) if dk == 1 else _text(dv) if dk == 2 else entry
                            dims.append(entry)
                        shape = tuple(dims)
    return ValueInfo(name, elem_type, shape)


@dataclass
class Graph:
    nodes: list[Node]
    initializers: dict[str, np.ndarray]
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    opset: int


def parse_model(data: bytes) -> Graph:
    """The graph of an ONNX ``ModelProto`` serialised in ``data``."""
    graph_buf: bytes | None = None
    opset = 0
    ir_version = 0
    for number, _wire, value in _fields(data):
        if number == 1:
            ir_version = value
        elif number == 7:
            graph_buf = value
        elif number == 8:
            domain, version = "", 0
            for k, _w, v in _fields(value):
                if k == 1:
                    domain = _text(v)
                elif k == 2:
                    version = _signed(v)
            if domain in ("", "ai.onnx"):
                opset = version
            else:
                raise UnsupportedModel(f"the model imports operator set {domain!r}")
    if graph_buf is None or not ir_version or not opset:
        raise OnnxFormatError("not an ONNX model (no graph, IR version or default opset)")
    nodes: list[Node] = []
    inits: dict[str, np.ndarray] = {}
    inputs: list[ValueInfo] = []
    outputs: list[ValueInfo] = []
    for number, _wire, value in _fields(graph_buf):
        if number == 1:
            nodes.append(_node(value))
        elif number == 5:
            name, array = _tensor(value)
            inits[name] = array
        elif number == 11:
            inputs.append(_value_info(value))
        elif number == 12:
            outputs.append(_value_info(value))
        elif number == 15:
            raise UnsupportedModel("sparse initializers")
    # Graph inputs that have an initializer are constants (IR < 4 lists them as inputs).
    inputs = [v for v in inputs if v.name not in inits]
    if not outputs or not nodes:
        raise OnnxFormatError("the graph has no nodes or no outputs")
    return Graph(nodes, inits, inputs, outputs, opset)


# --- operators -------------------------------------------------------------------------------
def _reduce_mean(node: Node, args: list[np.ndarray | None], opset: int) -> np.ndarray:
    x = args[0]
    axes: Any = node.attrs.get("axes")
    if opset >= 18:
        axes = None if len(args) < 2 or args[1] is None else [int(a) for a in args[1]]
        if not axes and node.attrs.get("noop_with_empty_axes", 0):
            return x
    keepdims = bool(node.attrs.get("keepdims", 1))
    axis = None if not axes else tuple(int(a) for a in axes)
    return np.mean(x, axis=axis, keepdims=keepdims, dtype=x.dtype)


def _slice(node: Node, args: list[np.ndarray | None], opset: int) -> np.ndarray:
    x = args[0]
    if opset < 10:
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes = node.attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = [int(v) for v in args[1]], [int(v) for v in args[2]]
        axes = [int(v) for v in args[3]] if len(args) > 3 and args[3] is not None else list(range(len(starts)))
        steps = [int(v) for v in args[4]] if len(args) > 4 and args[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step == 0:
            raise ValueError("Slice: step 0")
        # ONNX clamps like Python slicing; INT64_MIN/MAX "to the end" work the same
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def _concat(node: Node, args: list[np.ndarray | None], opset: int) -> np.ndarray:
    return np.concatenate(args, axis=int(node.attrs["axis"]))


def _binary(fn: Any) -> Any:
    def op(node: Node, args: list[np.ndarray | None], opset: int) -> np.ndarray:
        a, b = args
        if a.dtype != b.dtype:
            raise ValueError(f"{node.op}: input types differ ({a.dtype}, {b.dtype})")
        return fn(a, b)
    return op


OPS = {
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(np.divide),
    "MatMul": _binary(np.matmul),
    "Sqrt": lambda node, args, opset: np.sqrt(args[0]),
    "Identity": lambda node, args, opset: args[0],
    "ReduceMean": _reduce_mean,
    "Slice": _slice,
    "Concat": _concat,
}
SUPPORTED_OPS = frozenset(OPS)


class NumpySession:
    """Runs one ONNX model with numpy; ``run`` has ``onnxruntime.InferenceSession.run``'s shape.

    Raises ``OnnxFormatError`` for a file that is not an ONNX model and ``UnsupportedModel``
    for one that uses anything outside ``SUPPORTED_OPS``."""

    def __init__(self, path: str | Path) -> None:
        self.graph = parse_model(Path(path).read_bytes())
        missing = sorted({n.op for n in self.graph.nodes} - SUPPORTED_OPS)
        if missing:
            raise UnsupportedModel(f"operators {', '.join(missing)} are not implemented by the numpy backend")
        for value in self.graph.inputs:
            if value.elem_type != 1:
                raise UnsupportedModel(f"input {value.name!r} is not float32")

    def input_names(self) -> list[str]:
        return [v.name for v in self.graph.inputs]

    def output_names(self) -> list[str]:
        return [v.name for v in self.graph.outputs]

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        values: dict[str, np.ndarray] = dict(self.graph.initializers)
        for info in self.graph.inputs:
            if info.name not in feeds:
                raise ValueError(f"missing input {info.name!r}")
            array = np.asarray(feeds[info.name])
            if array.dtype != np.float32:
                raise ValueError(f"input {info.name!r}: expected float32, got {array.dtype}")
            if info.shape is not None and (array.ndim != len(info.shape) or any(
                    isinstance(d, int) and d != n for d, n in zip(info.shape, array.shape, strict=True))):
                raise ValueError(f"input {info.name!r}: shape {array.shape} does not fit {info.shape}")
            values[info.name] = array
        opset = self.graph.opset
        for node in self.graph.nodes:
            try:
                args = [values[name] if name else None for name in node.inputs]
            except KeyError as exc:
                raise ValueError(f"{node.op}: input {exc} is not computed before it is used") from None
            out = OPS[node.op](node, args, opset)
            values[node.outputs[0]] = np.asarray(out)
        names = output_names or self.output_names()
        return [values[name] for name in names]


__all__ = ["SUPPORTED_OPS", "NumpySession", "OnnxFormatError", "UnsupportedModel", "parse_model"]
