"""Embedding vectors: made unit length once (`l2_normalise`), then compared by cosine (`similarity`); and how
they travel (`to_base64`, `parse_embedding`: a JSON list of numbers or base64 of little-endian float32).

The embedder returns unit-length rows, so the cosine of two embeddings is their dot product; clipping to
[-1, 1] takes away float32 rounding (a face against itself can give 1.0000001), so thresholds and
reported similarities stay inside the range every API field documents.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np

from service.errors import InvalidParameter


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


# How far from unit length a client's embedding may be: float32 rounding and a JSON round trip at 4+ significant
# digits stay well inside it; a raw, unnormalised network output (norms of 5 to 30 for these models) does not.
UNIT_TOLERANCE = 1e-3


def to_base64(vector: np.ndarray) -> str:
    """An embedding as base64 of its little-endian float32 bytes (4 bytes per dimension)."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def parse_embedding(value: Any, size: int, what: str) -> np.ndarray:
    """A client's embedding, as a JSON list of numbers or base64 of little-endian float32, checked: `size`
    finite values of unit length (within UNIT_TOLERANCE). Returns it as float32, re-normalised exactly; anything
    else raises InvalidParameter (422) naming `what`."""
    details = {"field": what, "expected_size": size}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):  # a JSON list sent as text (a multipart form field)
            try:
                value = json.loads(text)
            except (ValueError, RecursionError):
                raise InvalidParameter(f"{what} is not a JSON list of numbers", details=details) from None
        else:
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidParameter(
                    f"{what} is neither a JSON list of numbers nor base64 of float32", details=details
                ) from None
            if len(raw) != 4 * size:
                raise InvalidParameter(
                    f"{what} holds {len(raw)} bytes; {size} float32 values are {4 * size}", details=details
                )
            return _checked(np.frombuffer(raw, dtype="<f4").astype(np.float32), size, what, details)
    if not isinstance(value, list) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in value
    ):
        raise InvalidParameter(f"{what} must be a list of numbers or a base64 string", details=details)
    if len(value) != size:
        raise InvalidParameter(f"{what} has {len(value)} values; this model's embeddings have {size}", details=details)
    try:
        vector = np.asarray(value, dtype=np.float64)
    except OverflowError:  # an integer too large for a float
        raise InvalidParameter(f"{what} holds a value out of range", details=details) from None
    return _checked(vector, size, what, details)


def _checked(vector: np.ndarray, size: int, what: str, details: dict) -> np.ndarray:
    if vector.shape != (size,):
        raise InvalidParameter(f"{what} has {vector.size} values; this model's embeddings have {size}", details=details)
    if not np.isfinite(vector).all():
        raise InvalidParameter(f"{what} holds NaN or infinite values", details=details)
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if abs(norm - 1.0) > UNIT_TOLERANCE:
        raise InvalidParameter(
            f"{what} has length {norm:.6g}, not 1: send the L2-normalised embedding /embed returns",
            details={**details, "norm": norm, "tolerance": UNIT_TOLERANCE},
        )
    return (vector / norm).astype(np.float32)
