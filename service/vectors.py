"""Embedding vectors: made unit length once (`l2_normalise`), then compared by cosine (`similarity`).

The embedder returns unit-length rows, so the cosine of two embeddings is their dot product; clipping to
[-1, 1] takes away float32 rounding (a face against itself can give 1.0000001), so thresholds and
reported similarities stay inside the range every API field documents.
"""

from __future__ import annotations

import numpy as np


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row stays zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, eps)


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of unit-length embeddings, in [-1, 1] (float32).

    a: (D,) or (M, D); b: (D,) or (N, D). Returns a scalar array for two vectors, (M,) or (N,) for a matrix and
    a vector, (M, N) for two matrices.
    """
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    return np.clip(a @ b.T, -1.0, 1.0)
