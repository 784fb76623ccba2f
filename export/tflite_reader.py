"""Reading a TFLite MobileFaceNet flatbuffer onto our PyTorch `MobileFaceNet`, by graph structure.

Why the `tflite` package and not ai-edge-litert's interpreter: we need each operator's options (stride, padding,
fused activation, depth multiplier) and each constant's raw bytes. `tflite` is the generated flatbuffer schema,
so those are public, documented accessors on the file itself; the interpreter exposes operator lists only through
private helpers (`_get_ops_details`) and no options at all. The interpreter stays the reference we check parity
against (tests/test_mobilefacenet.py), so the reader and the judge are independent pieces of code.

The mapping never looks at tensor names. It walks the operators in execution order, follows the data flow from
the graph input, and recognises three patterns:

- a convolution (CONV_2D / DEPTHWISE_CONV_2D, no fused activation, no dilation) with a constant weight and bias;
- PReLU as TOCO writes it: relu(x) + c * (x - |x|) = RELU, ABS, SUB, MUL (c constant), ADD. Since
  x - |x| = 2 min(x, 0), the slope is alpha = 2c;
- a residual ADD of the running tensor and the input of the block that began three convolutions earlier.

The recognised convolutions must pair one-to-one with `MobileFaceNet.conv_units()` (same count, kernel shapes,
strides, padding, activation kind, residual positions); any mismatch raises TFLiteLayoutError naming the operator.
Each folded conv becomes conv (no bias) + BatchNorm with weight 1, bias b, mean 0, var 1 and eps 0, which is
x + b exactly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.checkpoint import load_strict
from models.mobilefacenet import InvertedResidual, MobileFaceNet, TFSameConv2d


class TFLiteLayoutError(ValueError):
    """The flatbuffer is not the MobileFaceNet graph we know how to map."""


@dataclass(frozen=True)
class Operator:
    index: int
    name: str  # builtin operator name, e.g. CONV_2D
    inputs: tuple[int, ...]  # tensor indices, -1 for an omitted optional input
    outputs: tuple[int, ...]
    options: dict[str, int]


@dataclass(frozen=True)
class ConvUnit:
    """One convolution of the TFLite graph, weights already in PyTorch layout."""

    op: int  # operator index of the convolution, for error messages
    depthwise: bool
    weight: np.ndarray  # (out, in/groups, kh, kw)
    bias: np.ndarray  # (out,)
    stride: tuple[int, int]
    same_padding: bool
    prelu_slope: np.ndarray | None  # (out,) when a PReLU follows, else None (linear)
    residual: bool  # a residual ADD follows (after the PReLU, if any)


class TFLiteGraph:
    """Operators and constant tensors of the first subgraph of a .tflite file."""

    def __init__(self, path: str | Path):
        import tflite

        self.path = Path(path)
        try:
            buf = self.path.read_bytes()
        except OSError as exc:
            raise TFLiteLayoutError(f"{self.path}: cannot read the file ({exc.strerror or exc})") from None
        # Every TFLite flatbuffer carries the file identifier "TFL3" in bytes 4-7. Checking it first turns a
        # foreign file (an ONNX graph, a PyTorch checkpoint, text) into a plain answer instead of an
        # out-of-range read deep inside the flatbuffer accessors.
        if len(buf) < 8 or not tflite.Model.ModelBufferHasIdentifier(buf, 0):
            raise TFLiteLayoutError(
                f"{self.path}: not a TFLite flatbuffer (no 'TFL3' file identifier in bytes 4-7; "
                f"{len(buf)} bytes, starting {buf[:8]!r})"
            )
        self._size = len(buf)
        try:
            self._parse(tflite, buf)
        except TFLiteLayoutError:
            raise
        except _CORRUPT as exc:  # a truncated file: its offsets point past the end of the buffer
            raise _corrupt(self.path, len(buf), exc) from exc

    def _parse(self, tflite, buf: bytes) -> None:
        self._model = tflite.Model.GetRootAsModel(buf, 0)
        if self._model.SubgraphsLength() < 1:
            raise TFLiteLayoutError(f"{self.path}: the flatbuffer holds no subgraph")
        graph = self._model.Subgraphs(0)
        self._graph = graph
        names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
        self.inputs = tuple(int(i) for i in graph.InputsAsNumpy())
        self.outputs = tuple(int(i) for i in graph.OutputsAsNumpy())
        self.operators: list[Operator] = []
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            code = self._model.OperatorCodes(op.OpcodeIndex())
            # Newer schemas moved the code to BuiltinCode; old files keep it in DeprecatedBuiltinCode.
            name = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "UNKNOWN")
            self.operators.append(
                Operator(
                    index=i,
                    name=name,
                    inputs=tuple(int(t) for t in op.InputsAsNumpy()),
                    outputs=tuple(int(t) for t in op.OutputsAsNumpy()),
                    options=_options(tflite, name, op),
                )
            )

    def shape(self, tensor: int) -> tuple[int, ...]:
        try:
            return tuple(int(d) for d in self._graph.Tensors(tensor).ShapeAsNumpy())
        except _CORRUPT as exc:
            raise _corrupt(self.path, self._size, exc) from exc

    def constant(self, tensor: int) -> np.ndarray | None:
        """The float32 data of a constant tensor, or None when the tensor is computed at run time."""
        import tflite

        try:
            t = self._graph.Tensors(tensor)
            data = self._model.Buffers(t.Buffer()).DataAsNumpy()
        except _CORRUPT as exc:  # TFLiteLayoutError cannot arise in here
            raise _corrupt(self.path, self._size, exc) from exc
        if isinstance(data, int) or data.size == 0:
            return None
        if t.Type() != tflite.TensorType.FLOAT32:
            raise TFLiteLayoutError(f"{self.path}: tensor {tensor} is not float32 (quantised models are not supported)")
        values = np.frombuffer(data.tobytes(), dtype="<f4")
        shape = self.shape(tensor)
        if values.size != int(np.prod(shape)):
            raise TFLiteLayoutError(f"{self.path}: tensor {tensor} has {values.size} values for shape {shape}")
        return values.reshape(shape).copy()


# What the generated flatbuffer accessors raise on a truncated or corrupted buffer: struct.error for an offset
# past the end, IndexError / ValueError from numpy views of vectors cut short.
_CORRUPT = (struct.error, IndexError, ValueError)


def _corrupt(path: Path, size: int, exc: Exception) -> TFLiteLayoutError:
    return TFLiteLayoutError(
        f"{path}: truncated or corrupt TFLite flatbuffer ({size} bytes; an offset inside it points outside "
        f"the file: {exc})"
    )


def _options(tflite, name: str, op) -> dict[str, int]:
    kinds = {"CONV_2D": tflite.Conv2DOptions, "DEPTHWISE_CONV_2D": tflite.DepthwiseConv2DOptions}
    kinds.update({k: getattr(tflite, f"{k.title()}Options") for k in ("ADD", "SUB", "MUL")})
    table = op.BuiltinOptions()
    if name not in kinds or table is None:
        return {}
    opts = kinds[name]()
    opts.Init(table.Bytes, table.Pos)
    out = {"activation": opts.FusedActivationFunction()}
    if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        out.update(
            padding=opts.Padding(),
            stride_h=opts.StrideH(),
            stride_w=opts.StrideW(),
            dilation_h=opts.DilationHFactor(),
            dilation_w=opts.DilationWFactor(),
        )
        if name == "DEPTHWISE_CONV_2D":
            out["depth_multiplier"] = opts.DepthMultiplier()
    return out


def conv_units(graph: TFLiteGraph) -> list[ConvUnit]:
    """The graph's convolutions in execution order, with their PReLUs and residual ADDs recognised."""
    import tflite

    ops = [op for op in graph.operators if op.name != "DELEGATE"]
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise TFLiteLayoutError(f"{graph.path}: expected one input and one output")
    current = graph.inputs[0]  # the tensor the next operator must consume
    block_inputs: list[int] = []  # input tensor of each convolution, to recognise residual shortcuts
    units: list[ConvUnit] = []
    i = 0

    def fail(op: Operator, why: str) -> TFLiteLayoutError:
        return TFLiteLayoutError(f"{graph.path}: operator {op.index} ({op.name}): {why}")

    while i < len(ops):
        op = ops[i]
        if op.name == "RESHAPE" and i == len(ops) - 1:
            if op.inputs[0] != current or op.outputs[0] != graph.outputs[0]:
                raise fail(op, "the final RESHAPE does not turn the last convolution into the graph output")
            break
        if op.name not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            raise fail(op, "expected a convolution here")
        if op.inputs[0] != current:
            raise fail(op, "does not consume the previous layer's output")
        o = op.options
        if o["activation"] != tflite.ActivationFunctionType.NONE:
            raise fail(op, "fused activations are not part of this layout")
        if (o["dilation_h"], o["dilation_w"]) != (1, 1) or o.get("depth_multiplier", 1) != 1:
            raise fail(op, "dilation or depth multiplier other than 1")
        weight = graph.constant(op.inputs[1])
        bias = graph.constant(op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
        if weight is None:
            raise fail(op, "weight is not a constant")
        depthwise = op.name == "DEPTHWISE_CONV_2D"
        # TFLite: CONV_2D weights (O, KH, KW, I); DEPTHWISE_CONV_2D weights (1, KH, KW, C). PyTorch: (O, I, KH, KW).
        weight = weight.transpose(3, 0, 1, 2) if depthwise else weight.transpose(0, 3, 1, 2)
        if bias is None:
            bias = np.zeros(weight.shape[0], np.float32)
        block_inputs.append(current)
        current = op.outputs[0]
        i += 1

        slope = None
        if i + 4 < len(ops) and [p.name for p in ops[i : i + 5]] == ["RELU", "ABS", "SUB", "MUL", "ADD"]:
            relu, absolute, sub, mul, add = ops[i : i + 5]
            x = current
            const = [t for t in mul.inputs if graph.constant(t) is not None]
            if not (
                relu.inputs == (x,)
                and absolute.inputs == (x,)
                and sub.inputs == (x, absolute.outputs[0])
                and len(const) == 1
                and set(mul.inputs) == {const[0], sub.outputs[0]}
                and set(add.inputs) == {relu.outputs[0], mul.outputs[0]}
            ):
                raise fail(relu, "RELU/ABS/SUB/MUL/ADD do not form relu(x) + c * (x - |x|)")
            c = graph.constant(const[0]).reshape(-1)
            if c.shape != (weight.shape[0],):
                raise fail(mul, f"PReLU constant has shape {c.shape}, expected ({weight.shape[0]},)")
            slope = 2.0 * c  # relu(x) + c (x - |x|) = max(x, 0) + 2c min(x, 0)
            current = add.outputs[0]
            i += 5

        residual = False
        if i < len(ops) and ops[i].name == "ADD" and current in ops[i].inputs:
            add = ops[i]
            (skip,) = [t for t in add.inputs if t != current] or [None]
            # An inverted residual adds its own input: the input of the expand conv, two convs back.
            if len(block_inputs) < 3 or skip != block_inputs[-3]:
                raise fail(add, "a residual ADD whose shortcut is not the input of the current bottleneck")
            residual = True
            current = add.outputs[0]
            i += 1

        units.append(
            ConvUnit(
                op=op.index,
                depthwise=depthwise,
                weight=np.ascontiguousarray(weight),
                bias=bias,
                stride=(o["stride_h"], o["stride_w"]),
                same_padding=o["padding"] == tflite.Padding.SAME,
                prelu_slope=slope,
                residual=residual,
            )
        )
    else:
        raise TFLiteLayoutError(f"{graph.path}: the graph does not end in a RESHAPE to its output")
    return units


def load_tflite(model: MobileFaceNet, path: str | Path) -> MobileFaceNet:
    """Fill `model` (the `tflite` layout) with the weights of a MobileFaceNet .tflite file; returns it in eval mode."""
    graph = TFLiteGraph(path)
    units = conv_units(graph)
    ours = list(model.conv_units())
    if len(units) != len(ours):
        raise TFLiteLayoutError(f"{graph.path}: {len(units)} convolutions, but MobileFaceNet has {len(ours)}")
    names = {m: n for n, m in model.named_modules()}
    residual_after = _residual_positions(model)
    state: dict[str, torch.Tensor] = {}
    for k, (unit, (conv, bn, act)) in enumerate(zip(units, ours)):
        where = f"{graph.path}: operator {unit.op} -> {names[conv]}"
        if tuple(conv.weight.shape) != unit.weight.shape:
            raise TFLiteLayoutError(f"{where}: weight {unit.weight.shape} vs ours {tuple(conv.weight.shape)}")
        if unit.depthwise != (conv.groups == conv.in_channels > 1):
            raise TFLiteLayoutError(f"{where}: depthwise in one graph, not in the other")
        if tuple(conv.stride) != unit.stride:
            raise TFLiteLayoutError(f"{where}: stride {unit.stride} vs ours {tuple(conv.stride)}")
        kh, kw = conv.kernel_size
        if unit.same_padding:
            # SAME: stride 1 pads (k-1)/2 on each side, like ours; stride 2 needs our bottom/right TFSameConv2d.
            ok = isinstance(conv, TFSameConv2d) if max(unit.stride) > 1 else conv.padding == ((kh - 1) // 2, (kw - 1) // 2)
        else:
            ok = not isinstance(conv, TFSameConv2d) and conv.padding == (0, 0)
        if not ok:
            raise TFLiteLayoutError(f"{where}: padding {'SAME' if unit.same_padding else 'VALID'} does not match ours")
        if (unit.prelu_slope is not None) != isinstance(act, nn.PReLU):
            raise TFLiteLayoutError(f"{where}: activation {'PReLU' if unit.prelu_slope is not None else 'none'} "
                                    f"vs ours {type(act).__name__ if act is not None else 'none'}")
        if unit.residual != (k in residual_after):
            raise TFLiteLayoutError(f"{where}: residual connection present in one graph only")
        if bn.eps != 0.0:
            raise TFLiteLayoutError(f"{where}: identity BN needs eps 0 (use the 'tflite' layout)")

        state[f"{names[conv]}.weight"] = torch.from_numpy(unit.weight)
        n = unit.weight.shape[0]
        bn_name = names[bn]
        state[f"{bn_name}.weight"] = torch.ones(n)
        state[f"{bn_name}.bias"] = torch.from_numpy(unit.bias.astype(np.float32))
        state[f"{bn_name}.running_mean"] = torch.zeros(n)
        state[f"{bn_name}.running_var"] = torch.ones(n)
        state[f"{bn_name}.num_batches_tracked"] = torch.tensor(0)
        if unit.prelu_slope is not None:
            state[f"{names[act]}.weight"] = torch.from_numpy(unit.prelu_slope.astype(np.float32))
    load_strict(model, state, str(graph.path))
    return model.eval()


def _residual_positions(model: MobileFaceNet) -> set[int]:
    """Indices into conv_units() after which our forward adds a shortcut (the project conv of a residual block)."""
    positions = set()
    for k, (conv, _, _) in enumerate(model.conv_units()):
        for block in model.features:
            if isinstance(block, InvertedResidual) and block.use_residual and block.conv[2] is conv:
                positions.add(k)
    return positions
