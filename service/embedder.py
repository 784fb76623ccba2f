"""One class for any face embedder ONNX file: it reads how to feed the network from the file's metadata.

Everything model-specific (input size, layout, colour order, mean/std, alignment template, embedding size,
recommended threshold, whether mirror averaging helps) comes from `metadata_props` (docs/model-contract.md);
a file whose metadata is missing or inconsistent with its graph is refused with ModelError at load time.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.decision import FarTable, FarTableError
from service.errors import InvalidParameter, ModelError
from service.onnx_model import model_identity, open_model
from service.vectors import l2_normalise

log = logging.getLogger(__name__)


class Embedder:
    """An ONNX face embedder: aligned BGR crops in, L2-normalised float32 embeddings out.

    model: a path to the .onnx file, or a ready `ort.InferenceSession` (then `path` is None and `sha256` is
    whatever the caller passes, since a session does not expose its file's bytes).
    flip: average with the mirrored crop's embedding; None follows the file's `face.embedder.flip`.
    max_batch: crops per ORT call (bounds memory; a flipped crop counts as one more).
    """

    def __init__(
        self,
        model: str | Path | ort.InferenceSession,
        session_options: ort.SessionOptions | None = None,
        flip: bool | None = None,
        *,
        max_batch: int = 32,
        sha256: str | None = None,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = int(max_batch)
        self.session, self.path, meta, source = open_model(
            model, session_options, kind="embedder", outputs=["embedding"]
        )
        self.metadata = meta
        if self.path is None:
            # No file to read the graph from: the caller's sha256 is the identity, with no earlier ones.
            self.sha256, self.model_id, self.earlier_ids = sha256, sha256, []
        else:
            # What the gallery tags embeddings with: the graph's sha256, so that a metadata change (a new FAR
            # table, a threshold) keeps enrolled faces comparable; earlier_ids are the tags older releases wrote.
            identity = model_identity(self.path)
            self.model_id, self.earlier_ids = identity.model_id, identity.earlier
            self.sha256 = sha256 or identity.file_sha256
        self.arch = meta.text("face.arch")
        self.layout, self.color, mean, std = meta.preprocessing()
        self.input_size: tuple[int, int] = meta.input_size()
        height, width = self.input_size
        self.embedding_size: int = meta.integer("face.embedder.embedding_size")
        self.template = np.asarray(meta.floats("face.embedder.template", (5, 2)), dtype=np.float64)
        if not (
            (self.template[:, 0] >= 0).all()
            and (self.template[:, 0] < width).all()
            and (self.template[:, 1] >= 0).all()
            and (self.template[:, 1] < height).all()
        ):
            raise meta.error("face.embedder.template", f"has points outside the {width}x{height} input")
        self.threshold: float | None = meta.number("face.embedder.threshold", optional=True, low=-1, high=1)
        table = meta.json("face.embedder.far_table", optional=True)
        try:
            self.far_table: FarTable | None = None if table is None else FarTable.from_json(table)
        except FarTableError as exc:
            raise meta.error("face.embedder.far_table", str(exc)) from None
        # The table and the 1:1 figures in one file should tell one story: a table claiming a FAR ten times
        # off the measured face.embedder.far at the threshold was measured on something else (or forged).
        self.far_table_warning: str | None = None
        far_1to1 = meta.number("face.embedder.far", optional=True, low=0, high=1)
        if self.far_table is not None and self.threshold is not None and far_1to1:
            table_far = self.far_table.far_at(self.threshold)
            if not far_1to1 / 10 <= table_far <= far_1to1 * 10:
                self.far_table_warning = (
                    f"{source}: its FAR table gives {table_far:.3g} at the 1:1 threshold {self.threshold}, but "
                    f"face.embedder.far says {far_1to1:.3g}; expected FPIRs rest on the table, check how it was made"
                )
                log.warning(self.far_table_warning)
        self.flip: bool = meta.boolean("face.embedder.flip", default=False) if flip is None else bool(flip)
        # Ids of earlier files of this network that the exporter vouches for (docs/model-contract.md).
        declared = meta.json("face.embedder.earlier_ids", optional=True) or []
        if not (isinstance(declared, list) and len(declared) <= 100
                and all(isinstance(s, str) and re.fullmatch(r"[0-9a-f]{64}", s) for s in declared)):
            raise meta.error("face.embedder.earlier_ids", "must be a list of at most 100 sha256 hex strings")
        self.earlier_ids = sorted({*self.earlier_ids, *declared} - {self.model_id})

        # (pixel - mean) / std == pixel * scale + offset, in the network's channel order.
        self._scale = (1.0 / np.asarray(std, dtype=np.float32)).astype(np.float32)
        self._offset = (-np.asarray(mean, dtype=np.float32) * self._scale).astype(np.float32)
        self._check_graph_shapes(source)

    def _check_graph_shapes(self, source: str) -> None:
        """Static dims in the graph must agree with the metadata; a fixed batch size caps max_batch."""
        height, width = self.input_size
        expected = [None, 3, height, width] if self.layout == "NCHW" else [None, height, width, 3]
        shape = self.session.get_inputs()[0].shape
        if len(shape) != 4:
            raise ModelError(f"{source}: input has rank {len(shape)}, expected 4 ({self.layout})")
        for dim, want, name in zip(shape[1:], expected[1:], ("dim 1", "dim 2", "dim 3")):
            if isinstance(dim, int) and dim != want:
                raise ModelError(
                    f"{source}: input {name} is {dim}, but metadata ({self.layout}, input_size "
                    f"{list(self.input_size)}) implies {want}"
                )
        if isinstance(shape[0], int) and shape[0] > 0:
            log.warning("%s: batch dimension is fixed at %d; batching accordingly", source, shape[0])
            self.max_batch = shape[0]
            self._fixed_batch = shape[0]
        else:
            self._fixed_batch = None
        out_shape = next(o.shape for o in self.session.get_outputs() if o.name == "embedding")
        if len(out_shape) != 2:
            raise ModelError(f"{source}: output 'embedding' has rank {len(out_shape)}, expected 2 [N, D]")
        if isinstance(out_shape[1], int) and out_shape[1] != self.embedding_size:
            raise ModelError(
                f"{source}: output 'embedding' has {out_shape[1]} values, metadata says "
                f"face.embedder.embedding_size = {self.embedding_size}"
            )

    def __repr__(self) -> str:
        return (
            f"Embedder({self.path or 'session'}, arch={self.arch}, input={list(self.input_size)}, "
            f"dim={self.embedding_size}, flip={self.flip})"
        )

    def preprocess(self, crops: np.ndarray) -> np.ndarray:
        """(N, h, w, 3) BGR uint8 -> the network's float32 input tensor, in its colour order and layout."""
        x = crops[..., ::-1] if self.color == "RGB" else crops
        x = x.astype(np.float32) * self._scale + self._offset
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

    def _run(self, crops: np.ndarray) -> np.ndarray:
        """Raw (un-normalised) embeddings, max_batch crops per ORT call."""
        out = []
        for start in range(0, len(crops), self.max_batch):
            batch = self.preprocess(crops[start : start + self.max_batch])
            n = len(batch)
            if self._fixed_batch and n < self._fixed_batch:  # pad a fixed-batch graph, drop the padding after
                batch = np.concatenate(
                    [batch, np.zeros((self._fixed_batch - n, *batch.shape[1:]), batch.dtype)]
                )
            (emb,) = self.session.run(["embedding"], {"input": batch})
            out.append(np.asarray(emb, dtype=np.float32)[:n])
        result = np.concatenate(out) if out else np.zeros((0, self.embedding_size), np.float32)
        if result.shape[1:] != (self.embedding_size,):
            raise ModelError(f"embedder returned shape {result.shape}, expected (N, {self.embedding_size})")
        return result

    def embed(self, crops: Sequence[np.ndarray] | np.ndarray, flip: bool | None = None) -> np.ndarray:
        """Aligned BGR uint8 crops of exactly `input_size` -> (N, D) float32, each row of unit length.

        With flip (default: self.flip), each embedding is the sum of the crop's and its mirror's, then
        normalised; the mirrored crops ride in the same ORT batches.
        """
        return self.embed_with_norms(crops, flip)[0]

    def embed_with_norms(
        self, crops: Sequence[np.ndarray] | np.ndarray, flip: bool | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`embed`, and each embedding's length before normalisation (N,): for margin-trained embedders it
        tracks how recognisable the face is (service/quality.py measures it on this model)."""
        height, width = self.input_size
        if isinstance(crops, np.ndarray) and crops.ndim == 4:
            batch = crops
        else:
            crops = list(crops)
            if not crops:
                return np.zeros((0, self.embedding_size), np.float32), np.zeros(0, np.float32)
            batch = np.stack([np.asarray(c) for c in crops])
        if batch.ndim != 4 or batch.shape[1:] != (height, width, 3):
            raise InvalidParameter(
                f"crops must be {height}x{width} BGR images (N, {height}, {width}, 3), got {batch.shape}"
            )
        if batch.dtype != np.uint8:
            raise InvalidParameter(f"crops must be uint8, got {batch.dtype}")
        n = len(batch)
        if n == 0:
            return np.zeros((0, self.embedding_size), np.float32), np.zeros(0, np.float32)
        use_flip = self.flip if flip is None else flip
        if use_flip:
            raw = self._run(np.concatenate([batch, batch[:, :, ::-1]]))
            raw = raw[:n] + raw[n:]
        else:
            raw = self._run(batch)
        return l2_normalise(raw), np.linalg.norm(raw, axis=1).astype(np.float32)
