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
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
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


def analysis_from_dict(doc: dict, where: str = "<json>") -> Analysis:
    """Rebuild an `Analysis` from its ``tbdiag.analysis/v1`` document (``null`` becomes ``nan``).

    Raises:
        TbdiagError: another schema, or a document missing required fields.
    """
    from tbdiag.analysis import SCHEMA, AnalyzeOptions

    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise TbdiagError(f"{where}: schema is {found!r}, not {SCHEMA}; pass a file written by tbdiag analyze --json")
    try:
        known = set(AnalyzeOptions.__dataclass_fields__)
        raw = {k: v for k, v in doc["options"].items() if k in known}
        raw["include"], raw["exclude"] = tuple(raw.get("include", ())), tuple(raw.get("exclude", ()))
        rows = []
        for r in doc["layers"]:
            values = {k: (math.nan if r.get(k) is None else r[k]) for k in LayerResult.__dataclass_fields__}
            values.update(name=r["name"], kind=r["kind"], shape=tuple(r["shape"]), n_evals=int(r["n_evals"]),
                          n_tail=int(r.get("n_tail") or 0), status=r["status"], warning=r.get("warning") or "")
            rows.append(LayerResult(**values))
        return Analysis(doc["source"], doc.get("format", "?"), int(doc.get("n_params") or 0), AnalyzeOptions(**raw),
                        tuple(rows), doc["summary"], doc.get("timing", {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise TbdiagError(f"{where}: incomplete {SCHEMA} document ({exc!r}); re-create it with tbdiag analyze --json") from None


def read_json(path: str | Path, hint: str) -> Any:
    """A JSON document, or a one-line `TbdiagError` ending with ``hint`` (what to do)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TbdiagError(f"{path}: no such file; {hint}") from None
    except (OSError, ValueError) as exc:
        raise TbdiagError(f"{path}: not a JSON file ({exc}); {hint}") from None


def read_analyses(path: str | Path) -> list[Analysis]:
    """The analyses of a JSON file written by ``tbdiag analyze --json`` (one object or an array)."""
    doc = read_json(path, "pass a file written by tbdiag analyze --json")
    docs = doc if isinstance(doc, list) else [doc]
    return [analysis_from_dict(d, str(path)) for d in docs]
