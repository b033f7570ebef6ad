"""Analyses as JSON (``tbdiag.analysis/v1``) and CSV, and atomic file writes."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tbdiag.analysis import Analysis
from tbdiag.errors import TbdiagError
from tbdiag.metrics import LayerResult

CSV_COLUMNS = ["source", *LayerResult.__dataclass_fields__]


def atomic_save(path: str | Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a half-written file.

    Raises:
        TbdiagError: the folder does not exist or is not writable.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise TbdiagError(f"{path}: folder {folder} does not exist; create it or choose another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise TbdiagError(f"{path}: cannot write in {folder} ({exc.strerror}); choose another path") from exc
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see `atomic_save`)."""
    atomic_save(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def jsonable(obj: Any) -> Any:
    """Replace non-finite floats with ``None`` (JSON ``null``), recursively; tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def _dump(doc: dict) -> str:
    """A document with one line per top-level key and one line per layer: diffable and greppable."""
    lines = []
    for key, value in doc.items():
        if key == "layers":
            rows = ",\n  ".join(json.dumps(r, allow_nan=False) for r in value)
            lines.append(f' "layers": [\n  {rows}\n ]')
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, allow_nan=False)}")
    return "{\n" + ",\n".join(lines) + "\n}"


def to_json(analyses: Sequence[Analysis]) -> str:
    """One analysis as a ``tbdiag.analysis/v1`` object; several as a JSON array of such objects."""
    docs = [_dump(jsonable(a.to_dict())) for a in analyses]
    return (docs[0] if len(docs) == 1 else "[\n" + ",\n".join(docs) + "\n]") + "\n"


def to_csv(analyses: Sequence[Analysis]) -> str:
    """One CSV row per layer of every analysis, with the source first; empty cells for ``nan``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for a in analyses:
        for row in a.to_dict()["layers"]:
            row = jsonable(row)
            row["shape"] = "x".join(str(s) for s in row["shape"])
            writer.writerow({"source": a.source, **{k: ("" if v is None else v) for k, v in row.items()}})
    return buf.getvalue()
