"""tbdiag in a notebook: DataFrames of analyses, diffs and TempBalance, the HTML card, figures, and the
example notebook run in a real kernel. pandas and IPython stay optional: the core works without them."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from tbdiag import TempBalance, analyze
from tbdiag.analysis.export import jsonable, to_json
from tbdiag.errors import TbdiagError
from tbdiag.finetune.diff import diff

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"
pd = pytest.importorskip("pandas")


def same(value, expected) -> bool:
    """A DataFrame cell against its JSON value: nan for null, tuples for lists."""
    if expected is None:
        return isinstance(value, float) and math.isnan(value)
    if isinstance(expected, list):
        return list(value) == expected
    return value == expected


def test_analysis_to_pandas_is_the_json_rows_in_model_order():
    a = analyze(SAMPLES / "cnn_trained.safetensors")
    rows = json.loads(to_json([a]))["layers"]
    df = a.to_pandas()
    assert isinstance(df, pd.DataFrame) and list(df.columns) == list(rows[0]) and len(df) == len(rows)
    assert list(df["name"]) == [r.name for r in a.layers]  # model order
    nulls = 0
    for i, row in enumerate(rows):
        for key, expected in row.items():
            assert same(df[key].iloc[i], expected), (row["name"], key, df[key].iloc[i], expected)
            nulls += expected is None
    assert nulls > 0 and df["num_traps"].isna().all() and df["alpha"].isna().sum() == 1  # features.0: too few


def test_diff_result_is_a_dict_with_a_dataframe():
    a, b = analyze(SAMPLES / "cnn_untrained.safetensors"), analyze(SAMPLES / "cnn_trained.safetensors")
    doc = diff(a, b)
    assert isinstance(doc, dict) and json.loads(json.dumps(jsonable(doc))) == jsonable(doc)
    df = doc.to_pandas()
    saved = jsonable(doc)
    assert list(df["name"]) == [e["name"] for e in doc["layers"]]  # the document's order (largest change first)
    assert list(df.columns[:5]) == ["name", "kind", "shape", "status_a", "status_b"]
    for i, e in enumerate(saved["layers"]):
        assert same(df["shape"].iloc[i], e["shape"]) and df["status_b"].iloc[i] == e["status"][1]
        for m in doc["metrics"]:
            for side, key in (("a", f"{m}_a"), ("b", f"{m}_b"), ("delta", f"{m}_delta")):
                assert same(df[key].iloc[i], e[side][m]), (e["name"], key)
    assert df["rand_distance_delta"].isna().all() and df["alpha_delta"].notna().any()
    from tbdiag.report.notebook import diff_frame

    pd.testing.assert_frame_equal(diff_frame(json.loads(json.dumps(saved))), df)  # read back from JSON: nulls → nan


class Blocks(nn.Module):
    """A stem, three blocks of two linears, a head: TempBalance tunes the blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(32, 96)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(96, 80 + 8 * i), nn.ReLU(), nn.Linear(80 + 8 * i, 96))
                                    for i in range(3))
        self.head = nn.Linear(96, 10)


@pytest.mark.parametrize("unit", ["layer", "block"])
def test_tempbalance_to_pandas_is_its_per_unit_state(unit):
    torch.manual_seed(0)
    model = Blocks()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tb = TempBalance(model, opt, device="cpu", unit=unit)
    df = tb.to_pandas()
    assert list(df.columns) == ["unit", "layers", "alpha", "multiplier", "lr"]
    assert list(df["unit"]) == tb.units and len(df) == (6 if unit == "layer" else 3)  # model order; no stem, head
    for _, row in df.iterrows():
        assert row["multiplier"] == tb.multipliers[row["unit"]]
        assert row["lr"] == pytest.approx(0.1 * tb.multipliers[row["unit"]])
        assert len(row["layers"]) == (1 if unit == "layer" else 2)
        assert row["alpha"] == pytest.approx(statistics.fmean(tb.values[n] for n in row["layers"]))
    assert min(df["multiplier"]) == 0.5 and max(df["multiplier"]) == 1.5


def odd_analysis(n: int = 3, **options):
    torch.manual_seed(0)
    names = ["<script>alert(1)</script>", "$x$", "a&b"] + [f"blocks.{i}.fc" for i in range(n - 3)]
    state = {f"{name}.weight": torch.randn(48, 40 + 2 * i) for i, name in enumerate(names)}
    return analyze(state, device="cpu", **options), names


def test_card_shows_summary_figure_and_every_layer_escaped():
    a, names = odd_analysis(fit="ks")
    card = a._repr_html_()
    assert "<script>" not in card and "alert(1)</script>" not in card
    assert card.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2  # its table row and its hover title
    assert "<td class=\"text\">$x$</td>" in card and "a&amp;b" in card and "a&b" not in card
    s = a.summary
    for label, value in (("alpha spread (std)", s["alpha_std"]), ("mean alpha", s["alpha_mean"]),
                         ("median alpha", s["alpha_median"])):
        assert f'{label}</div><div class="v">{value:.2f}<' in card
    assert f"{s['n_fitted']} / {s['n_layers']}" in card and "<code>&lt;state dict&gt;</code>" in card
    assert 'class="fig alpha-figure"' in card and "data:image/png;base64," in card
    rows = [line for line in card.splitlines() if line.startswith("<tr><td class=\"text\">")]
    assert [r.split('<td class="text">')[2].split("</td>")[0] for r in rows] == [
        n.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") for n in names]  # model order
    assert "<details open>" in card
    long_card = odd_analysis(30)[0]._repr_html_()
    assert "<details>" in long_card and "<details open>" not in long_card and long_card.count("<tr><td") == 30


def test_plot_draws_alpha_per_layer_over_the_bands_of_the_ks_fit_only():
    for fit, bands in (("ks", True), ("median", False)):
        a, _ = odd_analysis(8, fit=fit)
        fig = a.plot()
        assert isinstance(fig, Figure) and fig.get_axes()
        ax = fig.get_axes()[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == [r.name.replace("$", r"\$") for r in a.layers]
        points = ax.lines[0].get_ydata()
        assert list(points) == pytest.approx([r.alpha for r in a.layers], nan_ok=True)
        legend = ax.get_legend()
        assert (legend is not None and "2–6: typical" in [t.get_text() for t in legend.get_texts()]) == bands
        assert len(fig._repr_png_()) > 5000


def test_plot_esd_needs_the_spectra():
    a = analyze(SAMPLES / "cnn_trained.safetensors")
    with pytest.raises(TbdiagError, match="keep_spectra=True"):
        a.plot_esd("features.3")
    kept = analyze(SAMPLES / "cnn_trained.safetensors", keep_spectra=True)
    with pytest.raises(TbdiagError, match="no layer named 'features.33'; did you mean features.3"):
        kept.plot_esd("features.33")
    fig = kept.plot_esd("features.3")
    log_axes = fig.get_axes()[0]
    fitted = [line for line in log_axes.lines if line.get_label().startswith("α = ")]
    assert len(fitted) == 1 and f"{kept.layers[1].alpha:.2f}" in fitted[0].get_label()


def test_core_works_without_pandas_and_ipython():
    code = ("import sys\n"
            "for m in ('pandas', 'IPython'): sys.modules[m] = None  # not installed\n"
            "import tbdiag\n"
            "from tbdiag.errors import TbdiagError\n"
            f"a = tbdiag.analyze({str(SAMPLES / 'cnn_trained.safetensors')!r})\n"
            "assert 'tbdiag-card' in a._repr_html_() and a.plot() is not None\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n"
            "try:\n a.to_pandas()\nexcept TbdiagError as e:\n print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "to_pandas needs pandas" in proc.stdout and "pip install 'tbdiag[notebook]'" in proc.stdout


def test_example_notebook_runs_in_a_kernel():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    path = ROOT / "examples" / "notebook.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored without outputs
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("tbdiag-card" in h and "alpha spread (std)" in h and "<title>" in h for h in html)  # the card
    assert any('class="dataframe' in h and "features.6" in h for h in html)  # a DataFrame
    images = [o for o in outputs if {"image/png", "image/svg+xml"} & set(o.get("data", {}))]
    assert len(images) >= 2  # alpha per layer, one layer's ESD
