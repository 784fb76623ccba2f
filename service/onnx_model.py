"""What every ONNX model class in the service shares: opening a session, reading and checking its metadata.

The contract (docs/model-contract.md) puts everything needed to feed a model into the file's `metadata_props`.
`ModelMetadata` reads those string values with typed accessors that raise `ModelError` naming the key and the
file, so a broken file fails at load time with a message a user can act on, never later with a shape error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import onnxruntime as ort

from service.errors import ModelError

log = logging.getLogger(__name__)

LAYOUTS = ("NCHW", "NHWC")
COLORS = ("RGB", "BGR")


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (what `sha256sum` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# ModelProto's field numbers (onnx.proto): metadata_props is 14; StringStringEntryProto's key is 1.
_METADATA_FIELD = 14
_KEY_FIELD = 1


def _varint(data, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or oversized varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def protobuf_fields(data) -> list[tuple[int, int, int, int, int]]:
    """The top-level fields of a serialized protobuf message: (field number, start, end, payload start,
    payload end), where start..end is the whole record and the payload is a length-delimited field's bytes."""
    fields, pos = [], 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
            payload = (pos, pos)
        elif wire == 1:
            pos += 8
            payload = (pos, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            payload = (pos, pos + length)
            pos += length
        elif wire == 5:
            pos += 4
            payload = (pos, pos)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated protobuf field")
        fields.append((number, start, pos, *payload))
    return fields


class ModelIdentity(NamedTuple):
    model_id: str  # sha256 of the file without its metadata: what the gallery tags embeddings with
    earlier: list[str]  # ids older releases tagged this same network's faces with
    file_sha256: str  # the whole file's sha256 (what `sha256sum` prints)


def model_identity(
    path: str | Path, *, ignored_metadata: Sequence[str] = ("face.embedder.far_table", "face.embedder.earlier_ids")
) -> ModelIdentity:
    """The model id, earlier ids of the same model, and the file's sha256, from one read of the file.

    The id is the sha256 of the file without its `metadata_props`: the network's graph and weights. Embeddings
    are comparable exactly when that is the same, so metadata that describes how to use a network (thresholds,
    a FAR table) can change without making every enrolled face foreign. Earlier releases tagged faces with the
    whole file's sha256; the earlier ids are that, and that of this file without the `ignored_metadata` entries
    (the file as it was before such an entry was added), so a gallery can re-tag those faces as this model's.
    Reads the protobuf's top level only (no `onnx` package in the service).
    """
    import itertools
    import mmap

    # Every subset of the ignored keys may be the one added since: one digest per subset left out.
    subsets = [frozenset(c) for r in range(1, len(ignored_metadata) + 1)
               for c in itertools.combinations(ignored_metadata, r)]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            fields = protobuf_fields(data)
        except ValueError as exc:
            raise ModelError(f"{path}: not an ONNX protobuf ({exc})", details={"path": str(path)}) from None
        graph, whole = hashlib.sha256(), hashlib.sha256()
        without = {subset: hashlib.sha256() for subset in subsets}
        try:
            for number, start, end, payload_start, payload_end in fields:
                with memoryview(data)[start:end] as record:  # hashed in place: no copy of a large graph
                    whole.update(record)
                    if number != _METADATA_FIELD:
                        graph.update(record)
                        for digest in without.values():
                            digest.update(record)
                        continue
                entry = bytes(data[payload_start:payload_end])  # one metadata entry: small
                key = next((entry[s:e] for n, _, _, s, e in protobuf_fields(entry) if n == _KEY_FIELD), b"")
                name = key.decode("utf-8", "replace")
                for subset, digest in without.items():
                    if name not in subset:
                        digest.update(data[start:end])
        except ValueError as exc:
            raise ModelError(f"{path}: not an ONNX protobuf ({exc})", details={"path": str(path)}) from None
    earlier = sorted({whole.hexdigest(), *(d.hexdigest() for d in without.values())})
    return ModelIdentity(graph.hexdigest(), earlier, whole.hexdigest())


def session_options(intra_op_threads: int = 0, inter_op_threads: int = 0) -> ort.SessionOptions:
    """ORT options; 0 threads means ORT's default (one intra-op thread per physical core)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(intra_op_threads)
    options.inter_op_num_threads = int(inter_op_threads)
    # Sequential execution: our graphs are chains of convolutions, the parallelism is inside each operator.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's default log level prints warnings for benign things (unused initialisers); errors still raise.
    options.log_severity_level = 3
    return options


def create_session(
    path: str | Path,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    *,
    options: ort.SessionOptions | None = None,
    providers: Sequence[str] | None = None,
) -> ort.InferenceSession:
    """Open an ONNX file on the CPU (or the given providers). Missing or unreadable files raise ModelError."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file", details={"path": str(path)})
    if options is None:
        options = session_options(intra_op_threads, inter_op_threads)
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
        )
    except Exception as exc:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...) for bad files
        raise ModelError(f"{path}: ONNX Runtime cannot load it: {exc}", details={"path": str(path)}) from exc


def read_metadata(session: ort.InferenceSession) -> dict[str, str]:
    """The file's `metadata_props` as a plain dict of strings (values still JSON-encoded where they are)."""
    return dict(session.get_modelmeta().custom_metadata_map)


class ModelMetadata(Mapping[str, str]):
    """Typed, checked access to a model's metadata; every failure is a ModelError naming key and model."""

    def __init__(self, raw: Mapping[str, str], source: str = "model"):
        self._raw = dict(raw)
        self.source = source

    def __getitem__(self, key: str) -> str:
        return self._raw[key]

    def __iter__(self):
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def error(self, key: str, problem: str) -> ModelError:
        return ModelError(
            f"{self.source}: metadata key '{key}' {problem} (see docs/model-contract.md)",
            details={"model": self.source, "key": key},
        )

    def text(self, key: str) -> str:
        value = self._raw.get(key)
        if value is None or not value.strip():
            raise self.error(key, "is missing")
        return value.strip()

    def choice(self, key: str, options: Sequence[str]) -> str:
        value = self.text(key)
        if value not in options:
            raise self.error(key, f"is {value!r}, expected one of {list(options)}")
        return value

    def json(self, key: str, *, optional: bool = False) -> Any:
        if optional and not (self._raw.get(key) or "").strip():
            return None
        try:
            return json.loads(self.text(key))
        except json.JSONDecodeError as exc:
            raise self.error(key, f"is not valid JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:  # a 5,000-digit integer, absurd nesting
            raise self.error(key, f"is not usable JSON ({type(exc).__name__})") from None

    def number(self, key: str, *, optional: bool = False, low: float = -math.inf, high: float = math.inf):
        """A finite float in [low, high]; None when optional and absent."""
        value = self.json(key, optional=optional)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(key, f"is {value!r}, expected a finite number")
        if not low <= value <= high:
            raise self.error(key, f"is {value}, expected a value in [{low}, {high}]")
        return float(value)

    def integer(self, key: str, *, low: int = 1) -> int:
        value = self.json(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.error(key, f"is {value!r}, expected an integer >= {low}")
        return value

    def boolean(self, key: str, *, default: bool | None = None) -> bool | None:
        raw = (self._raw.get(key) or "").strip().lower()
        if not raw:
            return default
        if raw not in ("true", "false"):
            raise self.error(key, f"is {raw!r}, expected true or false")
        return raw == "true"

    def floats(self, key: str, shape: tuple[int, ...]) -> list:
        """A JSON (nested) list of finite numbers with exactly `shape`; returned as nested Python floats."""
        value = self.json(key)

        def check(v, dims):
            if not dims:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise self.error(key, f"holds {v!r}, expected finite numbers of shape {list(shape)}")
                return float(v)
            if not isinstance(v, list) or len(v) != dims[0]:
                raise self.error(key, f"is {self._raw.get(key)!r}, expected a list of shape {list(shape)}")
            return [check(x, dims[1:]) for x in v]

        return check(value, shape)

    def input_size(self, key: str = "face.input_size", *, optional: bool = False) -> tuple[int, int] | None:
        """`[height, width]` in pixels, or None where the contract allows `null` (dynamic size)."""
        value = self.json(key)
        if value is None:
            if optional:
                return None
            raise self.error(key, "is null, but this model needs a fixed [height, width]")
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        ):
            raise self.error(key, f"is {value!r}, expected [height, width] as positive integers")
        return int(value[0]), int(value[1])

    def preprocessing(self) -> tuple[str, str, list[float], list[float]]:
        """(layout, color, mean, std) as the contract states them; std must be non-zero."""
        layout = self.choice("face.layout", LAYOUTS)
        color = self.choice("face.color", COLORS)
        mean = self.floats("face.mean", (3,))
        std = self.floats("face.std", (3,))
        if any(s == 0 for s in std):
            raise self.error("face.std", f"is {std}: a zero std would divide by zero")
        return layout, color, mean, std


def check_io(
    session: ort.InferenceSession, source: str, *, outputs: Sequence[str], input_name: str = "input"
) -> None:
    """The contract fixes input and output names: refuse a graph that does not use them."""
    inputs = [i.name for i in session.get_inputs()]
    if inputs != [input_name]:
        raise ModelError(
            f"{source}: expected one input named '{input_name}', found {inputs}", details={"model": source}
        )
    names = [o.name for o in session.get_outputs()]
    missing = [n for n in outputs if n not in names]
    if missing:
        raise ModelError(
            f"{source}: outputs {missing} missing (graph has {names})", details={"model": source}
        )


class OpenedModel(NamedTuple):
    session: ort.InferenceSession
    path: Path | None  # None when the caller handed over a ready session
    metadata: ModelMetadata
    source: str  # how messages name the model: the file name, or "<kind> session"


def open_model(
    model: str | Path | ort.InferenceSession,
    session_options: ort.SessionOptions | None,
    *,
    kind: str,
    outputs: Sequence[str],
) -> OpenedModel:
    """What every model class does first: open the file (or take a ready session), read its metadata, and
    refuse a file of the wrong `face.kind` or with the wrong input/output names, naming the file."""
    if isinstance(model, ort.InferenceSession):
        session, path, source = model, None, f"{kind} session"
    else:
        path = Path(model)
        session, source = create_session(path, options=session_options), path.name
    metadata = ModelMetadata(read_metadata(session), source)
    found = metadata.choice("face.kind", ("detector", "embedder"))
    if found != kind:
        raise metadata.error("face.kind", f"is {found!r}: this file is not {'an' if kind[0] in 'aeiou' else 'a'} {kind}")
    check_io(session, source, outputs=outputs)
    return OpenedModel(session, path, metadata, source)
