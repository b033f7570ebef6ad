"""Analyses as JSON (``tbdiag.analysis/v1``) and CSV, and atomic file writes."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tbdiag.analysis import Analysis
from tbdiag.errors import TbdiagError
from tbdiag.metrics import LayerResult, summarize

CSV_COLUMNS = ["source", *(f for f in LayerResult.__dataclass_fields__ if f != "traps")]  # traps: a list, JSON only


# Files a reader of an input folder opens or may open: checkpoints, shard indexes, configs, run state.
READ_SUFFIXES = frozenset({".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".th", ".pkl", ".tar", ".json", ".jsonl"})
_FOLDER_DEPTH = 3  # input folders are searched this deep for files an output must not replace


def check_outputs(targets: Sequence[str | Path], inputs: Sequence[str | Path] = ()) -> list[Path]:
    """Check output files before any work starts; return the paths they will be written to.

    Refused, with a one-line `TbdiagError`: a target that is a folder or not a regular file, whose folder
    does not exist or cannot be written, that two targets name (through any spelling), that is an input or
    the same file as one (symlinks, hard links, relative paths), that is the same file as one an input
    folder holds (a shard, an index, a run's metrics), or that is a new file inside an input folder with a
    name that folder's reader would pick up (``READ_SUFFIXES``). A symlink target is written through: the
    file it points to is replaced, the link stays.
    """
    resolved: list[Path] = []
    seen: dict[Path, str] = {}
    for target in targets:
        path = Path(target).resolve()
        if path.is_dir():
            raise TbdiagError(f"{target}: is a folder; name a file (e.g. {Path(target) / 'out'})")
        if path.exists() and not path.is_file():
            raise TbdiagError(f"{target}: is not a regular file; name a regular file")
        if not path.parent.is_dir():
            raise TbdiagError(f"{target}: folder {Path(target).parent} does not exist; create it or choose another path")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise TbdiagError(f"{target}: folder {Path(target).parent} is not writable; choose another path")
        if path in seen:
            raise TbdiagError(f"{target}: names the same file as {seen[path]}; give each output its own file")
        seen[path] = str(target)
        _refuse_inputs(str(target), path, inputs)
        resolved.append(path)
    return resolved


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _refuse_inputs(target: str, path: Path, inputs: Sequence[str | Path]) -> None:
    """Raise when the output ``path`` (resolved) is, or lies among the read files of, one of ``inputs``."""
    ident = _identity(path)
    for source in inputs:
        source_path = Path(source)
        if not source_path.exists():
            continue  # reported by whoever reads it
        if ident is not None and _identity(source_path) == ident:
            raise TbdiagError(f"{target}: is the input {source}; write the output to another file")
        if not source_path.is_dir():
            continue
        folder = source_path.resolve()
        if ident is not None:
            for held in _read_files(folder):
                if _identity(held) == ident:
                    raise TbdiagError(f"{target}: is the same file as {held}, part of the input {source}; "
                                      "write the output to another file")
        if path.is_relative_to(folder) and path.suffix in READ_SUFFIXES:
            raise TbdiagError(f"{target}: is inside the input folder {source}, which reads files like it; "
                              "write the output outside that folder")


def _read_files(folder: Path) -> Iterator[Path]:
    """Files with a ``READ_SUFFIXES`` name in ``folder``, ``_FOLDER_DEPTH`` levels deep."""
    level = [folder]
    for _ in range(_FOLDER_DEPTH):
        below = []
        for d in level:
            try:
                entries = list(d.iterdir())
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir():
                    below.append(entry)
                elif entry.suffix in READ_SUFFIXES:
                    yield entry
        level = below


def _temporary(path: Path) -> Path:
    """An empty temporary file beside ``path`` with the usual permissions (mkstemp makes 0600)."""
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
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _fill(tmp: Path, write: Callable[[Path], None]) -> None:
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())


def atomic_save(path: str | Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a half-written file.

    Raises:
        TbdiagError: the folder does not exist or is not writable.
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        _fill(tmp, write)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see `atomic_save`)."""
    atomic_save(path, lambda tmp: _write_text(tmp, text))


def _write_text(tmp: Path, text: str) -> None:
    tmp.write_text(text, encoding="utf-8", newline="")


def write_outputs(files: Sequence[tuple[str | Path, str]]) -> None:
    """Write every ``(path, text)`` or none of them.

    Each text goes to a temporary file beside its path first; only when all are written and synced are
    they renamed over their paths. Should a rename fail, the files already replaced get their previous
    content back (kept meanwhile as a hard link) and files that did not exist are removed. Paths should
    have passed `check_outputs`.

    Raises:
        TbdiagError: a folder is missing or not writable, or a write or rename failed; nothing was written.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, text in files:
            path = Path(path)
            temps.append((path, _temporary(path)))
            _fill(temps[-1][1], lambda tmp, text=text: _write_text(tmp, text))
        _replace_all(temps)
    except OSError as exc:
        where = next((str(p) for p, t in temps if str(t) == exc.filename), exc.filename or "output")
        raise TbdiagError(f"{where}: cannot write ({exc.strerror}); nothing was written; "
                          "check the disk and the folder's permissions") from None
    finally:
        for _, tmp in temps:
            tmp.unlink(missing_ok=True)


def _replace_all(temps: Sequence[tuple[Path, Path]]) -> None:
    """Rename each temporary over its path; on a failure, put back what the earlier renames replaced."""
    done: list[tuple[Path, Path | None]] = []  # (path, hard link to its previous content, or None: was new)
    try:
        for path, tmp in temps:
            previous = _keep(path)
            try:
                os.replace(tmp, path)
            except BaseException:
                if previous is not None:
                    previous.unlink(missing_ok=True)
                raise
            done.append((path, previous))
    except BaseException:
        for path, previous in reversed(done):
            if previous is not None:
                os.replace(previous, path)
            else:
                path.unlink(missing_ok=True)
        raise
    finally:
        for _, previous in done:
            if previous is not None:
                previous.unlink(missing_ok=True)


def _keep(path: Path) -> Path | None:
    """A hard link to (or, where links are not possible, a copy of) ``path`` beside it; None: no such file."""
    if not path.exists():
        return None
    keep = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.keep")
    try:
        os.link(path, keep)
    except OSError:
        shutil.copy2(path, keep)
    return keep


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
            row.pop("traps", None)
            row["shape"] = "x".join(str(s) for s in row["shape"])
            writer.writerow({"source": a.source, **{k: ("" if v is None else v) for k, v in row.items()}})
    return buf.getvalue()


def analysis_from_dict(doc: Any, where: str = "<json>") -> Analysis:
    """Rebuild an `Analysis` from its ``tbdiag.analysis/v1`` document (``null`` becomes ``nan``).

    Every field is checked: numbers (or ``null``) where numbers belong, whole numbers for counts, strings,
    lists and objects where those belong; ``options.fit`` is required (the default fit changed). The
    summary is recomputed from the rows (`tbdiag.metrics.summarize`), so it always matches them.

    Raises:
        TbdiagError: another schema, or a malformed or incomplete document (one line naming the field).
    """
    from tbdiag.analysis import SCHEMA, VIEWS

    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise TbdiagError(f"{where}: schema is {found!r}, not {SCHEMA}; pass an analysis JSON written by tbdiag")
    check = _Fields(where)
    options = _options(check, check.mapping(doc.get("options", _MISSING), "options"))
    layers = check.array(doc.get("layers", _MISSING), "layers")
    if not layers:
        raise check.bad("layers", layers, "a list of layers (tbdiag never writes an analysis without layers)")
    rows = tuple(_row(check, r, f"layers[{i}]") for i, r in enumerate(layers))
    skipped = doc["summary"].get("skipped", {}) if isinstance(doc.get("summary"), dict) else {}
    summary = dict(summarize(rows), skipped=skipped if isinstance(skipped, dict) else {})
    view = check.text(doc.get("view", "weights"), "view")
    if view not in VIEWS:
        raise check.bad("view", view, f"one of {', '.join(VIEWS)}")
    return Analysis(check.text(doc.get("source", _MISSING), "source"), check.text(doc.get("format", "?"), "format"),
                    check.count(doc.get("n_params", 0), "n_params", null=0), options, rows, summary,
                    check.mapping(doc.get("timing", {}), "timing"),
                    base=None if doc.get("base") is None else check.text(doc["base"], "base"),
                    view=view)


class _Fields:
    """Type checks of a document's fields, raising a one-line `TbdiagError` that names the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def bad(self, what: str, value: Any, expected: str) -> TbdiagError:
        shown = "missing" if value is _MISSING else f"{json.dumps(value)[:40]!s}"
        return TbdiagError(f"{self.where}: {what} is {shown}, not {expected}; the file is damaged or not "
                           "written by tbdiag: analyse the checkpoint again")

    def number(self, value: Any, what: str, null: bool = True) -> float:
        """A number, or ``nan`` for ``null`` (and for NaN/Infinity, which tbdiag never writes)."""
        if value is None and null:
            return math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.bad(what, value, "a number or null" if null else "a number")
        return float(value) if math.isfinite(value) else math.nan

    def count(self, value: Any, what: str, null: int | None = None) -> int:
        if value is None and null is not None:
            return null
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.bad(what, value, "a whole number ≥ 0" + (" or null" if null is not None else ""))
        return value

    def text(self, value: Any, what: str, null: str | None = None) -> str:
        if value is None and null is not None:
            return null
        if not isinstance(value, str):
            raise self.bad(what, value, "a string" + (" or null" if null is not None else ""))
        return value

    def flag(self, value: Any, what: str) -> bool:
        if not isinstance(value, bool):
            raise self.bad(what, value, "true or false")
        return value

    def array(self, value: Any, what: str) -> list:
        if not isinstance(value, list):
            raise self.bad(what, value, "a list")
        return value

    def mapping(self, value: Any, what: str) -> dict:
        if not isinstance(value, dict):
            raise self.bad(what, value, "an object")
        return value


_MISSING = object()


def _row(check: _Fields, r: Any, what: str) -> LayerResult:
    r = check.mapping(r, what)
    values: dict[str, Any] = {}
    for name, field in LayerResult.__dataclass_fields__.items():
        value, here = r.get(name, _MISSING), f"{what}.{name}"
        if field.type == "float":
            values[name] = check.number(None if value is _MISSING else value, here)
        elif name == "shape":
            values[name] = tuple(check.count(d, f"{here}[{j}]") for j, d in enumerate(check.array(value, here)))
        elif name == "n_tail":
            values[name] = check.count(None if value is _MISSING else value, here, null=0)
        elif field.type == "int | None":  # counts added later (num_spikes …): absent or null in older files
            values[name] = None if value is _MISSING or value is None else check.count(value, here)
        elif name == "traps":
            values[name] = _traps(check, [] if value is _MISSING else value, here)
        elif field.type == "int":
            values[name] = check.count(value, here)
        elif name == "warning":
            values[name] = check.text(None if value is _MISSING else value, here, null="")
        else:
            values[name] = check.text(value, here)
    return LayerResult(**values)


def _traps(check: _Fields, value: Any, what: str) -> tuple:
    """A row's correlation traps: a list of objects holding an ``eigenvalue`` and a list of ``entries``."""
    traps = []
    for i, trap in enumerate(check.array(value, what)):
        trap = check.mapping(trap, f"{what}[{i}]")
        entries = []
        for j, e in enumerate(check.array(trap.get("entries", _MISSING), f"{what}[{i}].entries")):
            e, here = check.mapping(e, f"{what}[{i}].entries[{j}]"), f"{what}[{i}].entries[{j}]"
            entries.append({"slice": check.count(e.get("slice", 0), f"{here}.slice"),
                            "row": check.count(e.get("row", _MISSING), f"{here}.row"),
                            "col": check.count(e.get("col", _MISSING), f"{here}.col"),
                            "value": check.number(e.get("value", _MISSING), f"{here}.value", null=False)})
        traps.append({"eigenvalue": check.number(trap.get("eigenvalue", _MISSING), f"{what}[{i}].eigenvalue"),
                      "entries": entries})
    return tuple(traps)


def _options(check: _Fields, raw: dict) -> Any:
    """`AnalyzeOptions` from a document's ``options``, each known field type-checked; ``fit`` required."""
    from tbdiag.analysis import AnalyzeOptions
    from tbdiag.powerlaw import FITS

    if check.text(raw.get("fit", _MISSING), "options.fit") not in FITS:
        raise check.bad("options.fit", raw["fit"], f"one of {', '.join(FITS)}")
    values: dict[str, Any] = {}
    for name, field in AnalyzeOptions.__dataclass_fields__.items():
        if name not in raw:
            continue  # older documents: the default
        value, here = raw[name], f"options.{name}"
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
        if kind == "float":
            values[name] = check.number(value, here, null=False)
        elif kind == "int":
            values[name] = check.count(value, here)
        elif kind == "bool":
            values[name] = check.flag(value, here)
        elif kind == "str":
            values[name] = check.text(value, here)
        elif kind == "str | None":
            values[name] = None if value is None else check.text(value, here)
        elif kind.startswith("tuple[str"):
            values[name] = tuple(check.text(v, f"{here}[{j}]") for j, v in enumerate(check.array(value, here)))
        else:
            values[name] = value
    try:
        return AnalyzeOptions(**values)
    except (TbdiagError, TypeError, ValueError) as exc:
        raise TbdiagError(f"{check.where}: options do not describe an analysis ({exc}); the file is damaged or "
                          "not written by tbdiag: analyse the checkpoint again") from None


def read_json(path: str | Path, hint: str) -> Any:
    """A JSON document, or a one-line `TbdiagError` ending with ``hint`` (what to do)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TbdiagError(f"{path}: no such file; {hint}") from None
    except (OSError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TbdiagError(f"{path}: not a JSON file ({reason}); {hint}") from None


def read_analyses(path: str | Path) -> list[Analysis]:
    """The analyses of a JSON file written by ``tbdiag analyze --json`` (one object or an array)."""
    doc = read_json(path, "pass an analysis JSON written by tbdiag")
    docs = doc if isinstance(doc, list) else [doc]
    if not docs:
        raise TbdiagError(f"{path}: an empty list, no analysis; pass an analysis JSON written by tbdiag")
    return [analysis_from_dict(d, f"{path}[{i}]" if isinstance(doc, list) else str(path)) for i, d in enumerate(docs)]
