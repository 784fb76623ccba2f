"""Writing a measured FAR(t) table into an embedder's ONNX metadata (`face.embedder.far_table`).

The table is what /identify sets its threshold from (service/decision.py); a model a user exported themselves
gets one from their own labelled photos with `python -m evaluate identify --write-table`. The file is rewritten
in place through a temporary file and a rename, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from service.decision import FarTable
from service.onnx_model import file_sha256

FAR_TABLE_KEY = "face.embedder.far_table"


def write_far_table(path: str | Path, table: dict, *, expected_sha256: str | None = None,
                    out: str | Path | None = None) -> str:
    """Put `table` (FarTable JSON) into the model's metadata, in `out` (a copy; default: the file itself);
    returns the written file's sha256. The model id the gallery tags faces with (the graph's sha256) does not
    change.

    expected_sha256: refuse to use a file that is not the one the table was measured with.
    """
    import onnx

    path = Path(path)
    out = path if out is None else Path(out)
    FarTable.from_json(table)  # refuse to write what the service would refuse to read
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise ValueError(f"{path} changed since it was evaluated; not writing a table measured on another file")
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("face.kind") != "embedder":
        raise ValueError(f"{path} is not an embedder (face.kind = {meta.get('face.kind')!r})")
    meta[FAR_TABLE_KEY] = json.dumps(table, separators=(",", ":"))
    del model.metadata_props[:]
    for key in sorted(meta):
        model.metadata_props.add(key=key, value=meta[key])
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, out)
    return file_sha256(out)
