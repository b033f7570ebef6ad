"""Analyses as JSON (``tbdiag.analysis/v1``) and CSV, and analysis JSON read back (every field checked)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tbdiag.analysis.core import Analysis
from tbdiag.errors import TbdiagError
from tbdiag.io.outputs import jsonable  # noqa: F401 - the JSON form of every document, re-exported
from tbdiag.esd.metrics import LayerResult, summarize

CSV_COLUMNS = ["source", *(f for f in LayerResult.__dataclass_fields__ if f != "traps")]  # traps: a list, JSON only


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
            row = jsonable(row)  # nan → None, which csv writes as an empty cell
            del row["traps"]
            row["shape"] = "x".join(str(s) for s in row["shape"])
            writer.writerow({"source": a.source, **row})
    return buf.getvalue()


def analysis_from_dict(doc: Any, where: str = "<json>") -> Analysis:
    """Rebuild an `Analysis` from its ``tbdiag.analysis/v1`` document (``null`` becomes ``nan``).

    Every field is checked: numbers (or ``null``) where numbers belong, whole numbers for counts, strings,
    lists and objects where those belong; ``options.fit`` is required (the default fit changed). The
    summary is recomputed from the rows (`tbdiag.esd.metrics.summarize`), so it always matches them.

    Raises:
        TbdiagError: another schema, or a malformed or incomplete document (one line naming the field).
    """
    from tbdiag.analysis.core import SCHEMA, VIEWS

    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise TbdiagError(f"{where}: schema is {found!r}, not {SCHEMA}; pass an analysis JSON written by tbdiag")
    check = _Fields(where)
    options = _options(check, check.mapping(doc.get("options", _MISSING), "options"))
    layers = check.array(doc.get("layers", _MISSING), "layers")
    if not layers:
        raise check.bad("layers", layers, "a list of layers (tbdiag never writes an analysis without layers)")
    rows = tuple(_row(check, r, f"layers[{i}]") for i, r in enumerate(layers))
    saved = doc.get("summary")
    skipped = saved.get("skipped") if isinstance(saved, dict) else None
    summary = dict(summarize(rows, options.fit), skipped=skipped if isinstance(skipped, dict) else {})
    view = check.text(doc.get("view", "weights"), "view")
    if view not in VIEWS:
        raise check.bad("view", view, f"one of {', '.join(VIEWS)}")
    return Analysis(check.text(doc.get("source", _MISSING), "source"), check.text(doc.get("format", "?"), "format"),
                    check.count(doc.get("n_params"), "n_params", null=0), options, rows, summary,
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
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range: no number tbdiag writes
            raise self.bad(what, value, "a number within float range") from None
        return number if math.isfinite(number) else math.nan

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
    from tbdiag.analysis.options import USER_ONLY, AnalyzeOptions
    from tbdiag.esd.powerlaw import FITS

    if check.text(raw.get("fit", _MISSING), "options.fit") not in FITS:
        raise check.bad("options.fit", raw["fit"], f"one of {', '.join(FITS)}")
    # absent (older documents): the default; a permission or a device is never taken from a file
    values = {name: _OPTION_TYPES[field.type](check, raw[name], f"options.{name}")
              for name, field in AnalyzeOptions.__dataclass_fields__.items() if name in raw and name not in USER_ONLY}
    try:
        return AnalyzeOptions(**values)
    except (TbdiagError, TypeError, ValueError) as exc:
        raise TbdiagError(f"{check.where}: options do not describe an analysis ({exc}); the file is damaged or "
                          "not written by tbdiag: analyse the checkpoint again") from None


# How an option's value is checked, by the type `AnalyzeOptions` declares for it (a string: postponed annotations).
_OPTION_TYPES: dict[str, Any] = {
    "float": lambda check, value, what: check.number(value, what, null=False),
    "int": lambda check, value, what: check.count(value, what),
    "bool": lambda check, value, what: check.flag(value, what),
    "str": lambda check, value, what: check.text(value, what),
    "str | None": lambda check, value, what: None if value is None else check.text(value, what),
    "tuple[str, ...]": lambda check, value, what: tuple(check.text(v, f"{what}[{j}]")
                                                        for j, v in enumerate(check.array(value, what))),
}


def read_json(path: str | Path, hint: str) -> Any:
    """A JSON document, or a one-line `TbdiagError` ending with ``hint`` (what to do). Only a regular file is
    opened: a pipe or a device would wait forever."""
    if Path(path).exists() and not Path(path).is_file():
        raise TbdiagError(f"{path}: not a regular file; {hint}")
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
