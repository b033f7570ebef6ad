"""``tbdiag diff A B``: per-layer change of alpha and the other metrics, as a table, JSON and an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tbdiag.cli.common import FLAG, KEY_HELP, OVERWRITE_HELP, Fit, Outputs, choices, err_console, out_console, require, user_errors


def diff_command(
    a: Annotated[str, typer.Argument(metavar="A", help="The analysis JSON or checkpoint to compare from (e.g. the base model).", show_default=False)],
    b: Annotated[str, typer.Argument(metavar="B", help="The one to compare to (e.g. the fine-tuned model).", show_default=False)],
    fit: Annotated[Optional[Fit], typer.Option(metavar=choices(Fit), help="Estimator for checkpoints analysed here (default: the fit of a JSON input, else ks); a checkpoint beside an analysis JSON is analysed with that analysis' options.", show_default=False)] = None,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda or cuda:N (checkpoints analysed here).")] = "auto",
    key: Annotated[Optional[str], typer.Option(metavar="NAME", help=KEY_HELP + " For checkpoints analysed here (default: found anew).")] = None,
    top: Annotated[int, typer.Option(metavar="N", help="Rows in the table (0: all); the JSON always has all.")] = 0,
    json_out: Annotated[Optional[str], typer.Option("--json", metavar="FILE", help="Write the tbdiag.diff/v1 JSON here ('-' for stdout).")] = None,
    html: Annotated[Optional[str], typer.Option("--html", metavar="FILE", help="Write the comparison report of A and B here.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", metavar=FLAG, help=OVERWRITE_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", metavar=FLAG, help="No table.")] = False,
) -> None:
    """Per-layer change of alpha and the other metrics from A to B, largest change of alpha first."""
    from tbdiag.errors import TbdiagError

    with user_errors():
        require(top >= 0, "--top", top, "must be 0 (all rows) or more")
        if html == "-":
            raise TbdiagError("--html -: an HTML report goes to a file; name one")
        outputs = Outputs.check({"--json": json_out, "--html": html}, [a, b], overwrite=overwrite)
        analyses = _load_both(a, b, fit.value if fit is not None else None, device, key, keep_spectra=html is not None)
        from tbdiag.finetune.diff import diff
        from tbdiag.analysis.export import jsonable

        doc = diff(*analyses)
        texts = {}
        if json_out:
            import json

            texts["--json"] = json.dumps(jsonable(doc), indent=1, allow_nan=False) + "\n"
        if html:
            from tbdiag.cli.analyze import label
            from tbdiag.report.render import comparison_report

            texts["--html"] = comparison_report([(label(x), x) for x in analyses])
        outputs.write(texts)
        if not quiet:
            from tbdiag.cli.render import diff_table

            table = diff_table(doc, top)
            if doc["changed_shape"]:  # same name, another shape: listed, never compared
                shapes = ", ".join(f"{c['name']} {c['shape_a']} → {c['shape_b']}" for c in doc["changed_shape"][:5])
                more = f" … (+{len(doc['changed_shape']) - 5})" if len(doc["changed_shape"]) > 5 else ""
                table.caption = (table.caption or "") + f"\nchanged shape, not compared: {shapes}{more}"
            (err_console if outputs.stdout else out_console).print(table)


def _load_both(a: str, b: str, fit: str | None, device: str, key: str | None, keep_spectra: bool) -> list:
    """A and B: analysis JSONs (one analysis each) as they are; checkpoints analysed here, with the options of
    the JSON beside them (so that both sides are measured alike) or with ``fit`` (default ks)."""
    import dataclasses

    from tbdiag.analysis.core import analyze
    from tbdiag.errors import TbdiagError
    from tbdiag.analysis.export import read_analyses
    from tbdiag.analysis.options import AnalyzeOptions

    found = {}
    for path in (a, b):
        if path.endswith(".json") and Path(path).is_file():
            analyses = read_analyses(path)
            if len(analyses) != 1:
                raise TbdiagError(f"{path}: holds {len(analyses)} analyses; write each to its own file and pass one")
            found[path] = analyses[0]
    like = next(iter(found.values())).options if found else AnalyzeOptions(fit=fit or "ks")
    options = dataclasses.replace(like, fit=fit or like.fit, device=device, key=key)  # not the JSON's: another file
    return [found[p] if p in found else analyze(p, options, keep_spectra=keep_spectra) for p in (a, b)]
