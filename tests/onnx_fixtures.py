"""Tiny ONNX graphs with hand-checkable outputs, to test how the service feeds models (not what they learned).

`channel_mean_embedder` builds an "embedder" whose embedding is the mean of each input channel after the
metadata's normalisation, so a test can compute the expected output of any colour order, mean, std or layout
by hand. Real-weight tests live beside these, on the default models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from export.templates import ARCFACE_TEMPLATE_112

onnx = __import__("pytest").importorskip("onnx")
from onnx import TensorProto, helper


def embedder_metadata(**overrides) -> dict[str, str]:
    meta = {
        "face.kind": "embedder",
        "face.arch": "channel-mean",
        "face.layout": "NCHW",
        "face.color": "RGB",
        "face.mean": json.dumps([127.5, 127.5, 127.5]),
        "face.std": json.dumps([128.0, 128.0, 128.0]),
        "face.input_size": json.dumps([112, 112]),
        "face.source": "tests",
        "face.source_sha256": "0" * 64,
        "face.exporter": "tests",
        "face.precision": "fp32",
        "face.embedder.template": json.dumps(ARCFACE_TEMPLATE_112),
        "face.embedder.embedding_size": "3",
        "face.embedder.threshold": "0.3",
        "face.embedder.flip": "false",
    }
    for key, value in overrides.items():
        key = key.replace("__", ".")
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return meta


def channel_mean_embedder(
    path: Path,
    *,
    layout: str = "NCHW",
    size: tuple[int, int] = (112, 112),
    output_name: str = "embedding",
    batch: int | str = "N",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write an ONNX model: embedding[n, c] = mean over pixels of input channel c (so D = 3)."""
    h, w = size
    shape = [batch, 3, h, w] if layout == "NCHW" else [batch, h, w, 3]
    axes = [2, 3] if layout == "NCHW" else [1, 2]
    node = helper.make_node("ReduceMean", ["input"], [output_name], axes=axes, keepdims=0)
    graph = helper.make_graph(
        [node],
        "channel_mean",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = metadata if metadata is not None else embedder_metadata(face__layout=layout)
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def expected_channel_means(crops_bgr: np.ndarray, color: str, mean, std) -> np.ndarray:
    x = crops_bgr[..., ::-1] if color == "RGB" else crops_bgr
    x = (x.astype(np.float64) - np.asarray(mean)) / np.asarray(std)
    return x.mean(axis=(1, 2))
