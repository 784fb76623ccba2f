"""Graph rewrites the exporter applies to every ONNX file, so that ONNX Runtime's CPU provider runs it fast.

First, `PRelu(z, s)` with a constant slope becomes

    y = z + b * Relu(c * z),   c = -|1 - s|,   b = sign(1 - s) (+1 where s == 1)

which is PRelu exactly in real arithmetic, per channel: where s <= 1, y = z + Relu((s - 1) z) (z for z >= 0,
s z for z < 0); where s > 1, y = z - Relu((1 - s) z) (the same two branches). Float32 differs from PRelu by an
ulp of z (the default embedder's 192-d outputs, norms 60-77, move by at most 1.8e-5 on real aligned faces:
tests/test_onnx_rewrite.py).

Why: ORT has no fused PRelu. Its NCHWc layout transformer, which runs every Conv of a MobileFaceNet in the
blocked layout, leaves a PRelu in plain NCHW, so each one costs a reorder out, the PRelu kernel and a reorder back
in: on the default embedder (33 PRelus) 8.1 of 17.6 ms of kernel time. The ops above are all ones that
transformer keeps in the blocked layout: a Mul by a per-channel constant becomes a 1x1 depthwise NCHWc conv, the
Relu fuses into it, and the Mul by b with the Add fuses into a second one (its `Sum` input). Measured against the
alternatives (BENCHMARKS.md, "Embedder graph"): `s z + (1 - s) Relu(z)` leaves the Relu unfused (one pass more),
`Relu(z) + s Min(z, 0)` and `Relu(z) - s Relu(-z)` keep Min/Neg/Sub in NCHW with reorders around them, and
`Max(z, s z)` is only PRelu where every slope is <= 1 (the default embedder's slopes run from -9.4 to 8.9).

A PRelu whose slope is not a constant (a graph input, a computed tensor) is left as it is.

A second rewrite, `pads_into_conv`, folds a zero-`Pad` that feeds only a Conv into that Conv's own (possibly
asymmetric) `pads`. torch.onnx.export writes TensorFlow-SAME stride-2 convolutions (the TFLite MobileFaceNet's
four) as Pad + Conv, with the pads computed by a chain of Slice/Transpose/Cast nodes it does not fold, and ORT
then runs each Pad in plain NCHW between reorders: 1.7 ms of the rewritten embedder's 18.6 ms of kernel time,
with the reorders around them another 1.0. Conv's own padding is zeros too, so the outputs are bit-identical.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Part of `face.exporter` (export/core.py exporter_name): a file exported before a rewrite existed reads as stale
# to `make models` and is rebuilt.
REWRITES = "prelu-as-relu, pads-into-conv"


def rewrite(model: onnx.ModelProto) -> dict[str, int]:
    """All the rewrites, in place; how many of each were made."""
    return {"PRelu as Relu": prelu_as_relu(model), "Pad into Conv": pads_into_conv(model)}


def prelu_as_relu(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every PRelu of `model`'s main graph whose slope is constant; returns how many."""
    graph = model.graph
    # An initializer that is also a graph input is a default the caller may override: not a constant.
    inputs = {v.name for v in graph.input}
    initializers = {t.name: t for t in graph.initializer if t.name not in inputs}
    constants = {
        node.output[0]: node
        for node in graph.node
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"
    }
    # torch.onnx.export passes shared or deduplicated parameters through Identity nodes.
    identities = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "Identity"}
    taken = {name for node in graph.node for name in (*node.input, *node.output)} | set(initializers)
    taken |= {v.name for v in (*graph.input, *graph.output)} | {node.name for node in graph.node}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    nodes: list[onnx.NodeProto] = []
    slopes: set[str] = set()
    rewritten = 0
    for node in graph.node:
        slope = _constant(node.input[1], initializers, constants, identities) if node.op_type == "PRelu" else None
        if slope is None:
            nodes.append(node)
            continue
        z, (y,) = node.input[0], node.output
        name = node.input[1]
        while name in identities:
            slopes.add(name)
            name = identities[name]
        slopes.add(name)
        base = node.name or f"prelu{rewritten}"
        t = 1.0 - slope.astype(np.float64)
        c = (-np.abs(t)).astype(np.float32)
        b = np.where(t < 0, -1.0, 1.0).astype(np.float32)
        c_name, cz, relu = fresh(f"{base}/c"), fresh(f"{base}/cz"), fresh(f"{base}/relu")
        graph.initializer.append(numpy_helper.from_array(c, c_name))
        nodes.append(helper.make_node("Mul", [z, c_name], [cz], name=fresh(f"{base}/Mul_c")))
        nodes.append(helper.make_node("Relu", [cz], [relu], name=fresh(f"{base}/Relu")))
        if (b < 0).any():  # some slopes > 1: those channels subtract the Relu term
            b_name, signed = fresh(f"{base}/b"), fresh(f"{base}/b_relu")
            graph.initializer.append(numpy_helper.from_array(b, b_name))
            nodes.append(helper.make_node("Mul", [relu, b_name], [signed], name=fresh(f"{base}/Mul_b")))
            relu = signed
        nodes.append(helper.make_node("Add", [z, relu], [y], name=fresh(f"{base}/Add")))
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_unused(graph, slopes)
    return rewritten


def _constant(name: str, initializers: dict, constants: dict, identities: dict) -> np.ndarray | None:
    while name in identities:
        name = identities[name]
    if name in initializers:
        array = numpy_helper.to_array(initializers[name])
    elif name in constants:
        array = numpy_helper.to_array(constants[name].attribute[0].t)
    else:
        return None
    return array if array.dtype == np.float32 else None


def _drop_unused(graph: onnx.GraphProto, names: set[str]) -> None:
    """Tensors a rewrite stopped reading (`names`: constants only, e.g. PRelu slopes, a Pad's computed pads): their
    initializers and the nodes that computed them, unless another node (also in a subgraph) or a graph output
    still reads them."""
    while True:
        used = {v.name for v in graph.output} | {name for node in _all_nodes(graph) for name in node.input}
        gone = names - used
        dead = [n for n in graph.node if n.output and set(n.output) <= gone]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    keep = [t for t in graph.initializer if t.name not in gone]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                yield from _all_nodes(sub)


def pads_into_conv(model: onnx.ModelProto) -> int:
    """Fold every constant zero-padding Pad whose only reader is a Conv (as its data input) into the Conv's pads,
    in place; returns how many."""
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in _all_nodes(graph):
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {v.name for v in graph.output}
    folded, chains = 0, set()
    for pad in list(graph.node):
        if pad.op_type != "Pad" or len(pad.input) < 2 or pad.output[0] in outputs:
            continue
        (conv, *others) = readers.get(pad.output[0], [None])
        if others or conv is None or conv.op_type != "Conv" or conv.input[0] != pad.output[0]:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        mode = next((helper.get_attribute_value(a) for a in pad.attribute if a.name == "mode"), b"constant")
        if mode != b"constant" or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b""):
            continue
        if len(pad.input) > 3 and pad.input[3]:  # explicit axes (opset 18): not written by our exporter
            continue
        pads, nodes = _evaluate(model, pad.input[1])
        value = np.zeros(1)
        if len(pad.input) > 2 and pad.input[2]:
            value, more = _evaluate(model, pad.input[2])
            nodes |= more
        if pads is None or value is None or np.any(value != 0) or pads.ndim != 1:
            continue
        rank = pads.size // 2
        begin, end = pads[:rank].astype(int), pads[rank:].astype(int)
        if rank < 3 or np.any(pads < 0) or np.any(begin[:2]) or np.any(end[:2]):
            continue
        spatial = rank - 2
        current = list(attrs.get("pads", [0] * (2 * spatial)))
        new = [current[i] + int(begin[2 + i]) for i in range(spatial)]
        new += [current[spatial + i] + int(end[2 + i]) for i in range(spatial)]
        for attribute in list(conv.attribute):
            if attribute.name in ("pads", "auto_pad"):
                conv.attribute.remove(attribute)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        graph.node.remove(pad)
        chains |= nodes | {name for name in pad.input[1:] if name}
        folded += 1
    if folded:
        _drop_unused(graph, chains)
    return folded


def _evaluate(model: onnx.ModelProto, name: str) -> tuple[np.ndarray | None, set[str]]:
    """The value of tensor `name` when it depends on constants only (initializers, Constant nodes and the nodes
    computing from them), with the names of the tensors on the way; (None, set()) when it depends on an input."""
    graph = model.graph
    inputs = {v.name for v in graph.input}
    initializers = {t.name: t for t in graph.initializer if t.name not in inputs}
    producers = {out: node for node in graph.node for out in node.output}
    needed: list[onnx.NodeProto] = []
    names: set[str] = set()
    stack = [name]
    while stack:
        current = stack.pop()
        if not current or current in names:
            continue
        names.add(current)
        if current in initializers:
            continue
        node = producers.get(current)
        if node is None or node.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike",
                                            "RandomUniformLike", "Multinomial", "Bernoulli"):
            return None, set()
        if node not in needed:
            needed.append(node)
        stack.extend(node.input)
    if name in initializers:
        return numpy_helper.to_array(initializers[name]), names
    order = [n for n in graph.node if n in needed]  # the graph's own (topological) order
    from onnx.reference import ReferenceEvaluator

    sub = helper.make_graph(order, "constant", [], [helper.make_tensor_value_info(name, 0, None)],
                            [initializers[n] for n in names if n in initializers])
    sub_model = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        (value,) = ReferenceEvaluator(sub_model).run(None, {})
    except Exception:  # an op the reference runtime lacks: leave the Pad alone  # noqa: BLE001
        return None, set()
    return np.asarray(value), names
