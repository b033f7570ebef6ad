import dataclasses
import html as html_lib
import json
import math
import re
import statistics
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tbdiag import analyze
from tbdiag.cli import app
from tbdiag.report.render import checkpoint_report, write_report
from tbdiag.train.loop import train
from tbdiag.runs.config import TrainConfig

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def assert_self_contained(html: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html), "external resource"
    assert "@import" not in html and "url(http" not in html
    for src in re.findall(r'<img[^>]+src="([^"]+)"', html):
        assert src.startswith("data:image/png;base64,")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for method in ("cal", "tb"):
        config = TrainConfig(model="cnn", data="synthetic", synthetic_size=128, batch_size=64, epochs=2, method=method, width=0.5)
        train(config, base / method, device="cpu")
        out[method] = base / method
    return out


def test_checkpoint_report_structure(tiny, tmp_path):
    a = analyze(tiny, keep_spectra=True, include_embeddings=True)
    html = checkpoint_report(a)
    assert_self_contained(html)
    for row in a.layers:
        assert f"ESD of {row.name}" in html and f"<td class=\"text\">{row.name}</td>" in html
    assert html.count("<details") == len(a.layers)
    assert "Recommended TempBalance multipliers" in html and "alpha per layer" in html


def test_report_from_saved_analyses_and_trajectory(tmp_path):
    j1, j2 = tmp_path / "untrained.json", tmp_path / "trained.json"
    for src, dst in (("cnn_untrained.safetensors", j1), ("cnn_trained.safetensors", j2)):
        assert runner.invoke(app, ["analyze", str(SAMPLES / src), "-q", "--json", str(dst)]).exit_code == 0
    out = tmp_path / "cmp.html"
    assert write_report([str(j1), str(j2)], out) == "comparison"
    html = out.read_text()
    assert_self_contained(html)
    assert "untrained" in html and "Largest changes" in html and "heat map" in html
    assert "No eigenvalues in these inputs" in html
    traj = tmp_path / "traj.html"
    res = runner.invoke(app, ["report", str(SAMPLES / "cnn_untrained.safetensors"), str(SAMPLES / "cnn_trained.safetensors"),
                              "--out", str(traj)])
    assert res.exit_code == 0, res.output
    html = traj.read_text()
    assert "ESDs of features.6" in html and "No eigenvalues" not in html
    single = tmp_path / "single.html"
    assert write_report([str(j2)], single) == "checkpoint" and "make the report from the checkpoint" in single.read_text()


def test_analyze_html_option(tmp_path):
    out = tmp_path / "a.html"
    res = runner.invoke(app, ["analyze", str(SAMPLES / "mlp_sharded"), "-q", "--html", str(out)])
    assert res.exit_code == 0 and "net.3" in out.read_text()


def test_run_reports(runs, tmp_path):
    out = tmp_path / "run.html"
    assert write_report([str(runs["tb"])], out) == "run"
    html = out.read_text()
    assert_self_contained(html)
    assert "alpha per tuned layer over epochs" in html and "alpha heat map of tb" in html and "ESD of features.3" in html
    both = tmp_path / "both.html"
    assert write_report([str(runs["cal"]), str(runs["tb"])], both) == "run"
    html = both.read_text()
    assert "cal vs tb" in html and "records no per-layer alpha" in html


def test_train_report_option_rewrites_each_epoch(tmp_path):
    report = tmp_path / "live.html"
    res = runner.invoke(app, ["train", "--model", "mlp", "--data", "synthetic", "--synthetic-size", "128", "--epochs", "2",
                              "--device", "cpu", "--out", str(tmp_path / "r"), "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert "2 / 2" in report.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_report_bad_inputs(tmp_path, runs):
    (tmp_path / "other.json").write_text(json.dumps({"schema": "tbdiag.multipliers/v1", "layers": {}}))
    (tmp_path / "empty").mkdir()
    empty_run = tmp_path / "empty_run"
    (empty_run / "checkpoints").mkdir(parents=True)  # a valid run that has not finished an epoch
    shutil.copy(runs["tb"] / "config.json", empty_run / "config.json")
    cases = [([tmp_path / "other.json"], "not tbdiag.analysis/v1"), ([tmp_path / "empty"], "empty folder"),
             ([empty_run], "no completed epoch"), ([runs["tb"], SAMPLES / "cnn_trained.safetensors"], "mixing"),
             ([tmp_path / "missing.json"], "no such file")]
    out = tmp_path / "r.html"
    for inputs, message in cases:
        res = runner.invoke(app, ["report", *map(str, inputs), "--out", str(out)])
        assert res.exit_code == 2 and message in res.stderr and "Traceback" not in res.output, (inputs, res.output)
        assert not out.exists()


# Injected into a copy of each page: measures every hoverable figure as laid out at 1280 px, and whether the
# pointer at the middle of each hover area reaches that area (its <title> is the browser's tooltip).
MEASURE = """<script>
(function () {
  var body = document.body, cs = getComputedStyle(body), out = {figures: []};
  out.content = body.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
  document.querySelectorAll("figure.fig").forEach(function (f) {
    var img = f.querySelector("img"), hits = [];
    f.querySelectorAll("svg.hover rect").forEach(function (rect) {
      window.scrollTo(0, window.scrollY + rect.getBoundingClientRect().top - 200);
      var b = rect.getBoundingClientRect(), r = img.getBoundingClientRect();
      var el = document.elementFromPoint(b.left + b.width / 2, b.top + b.height / 2);
      var inside = b.left >= r.left - 1 && b.right <= r.right + 1 && b.top >= r.top - 1 && b.bottom <= r.bottom + 1;
      hits.push({title: rect.querySelector("title").textContent, hit: el === rect && inside});
    });
    out.figures.push({kind: f.getAttribute("class"), width: img.getBoundingClientRect().width, hits: hits});
  });
  var pre = document.createElement("pre");
  pre.id = "measured";
  pre.textContent = JSON.stringify(out);
  body.appendChild(pre);
})();
</script>"""
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def measure_in_chromium(page: Path, profile: Path) -> tuple[str, dict]:
    """The page's DOM after load in headless Chromium at 1280 px, and what `MEASURE` found in it."""
    measured = page.with_name(f"measured-{page.name}")
    measured.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1280,2000", "--dump-dom",
                          measured.as_uri()], capture_output=True, text=True, timeout=300)
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stderr[-2000:]
    return dom.stdout, json.loads(html_lib.unescape(found.group(1)))


def first_lines(titles) -> list[str]:
    return [t.split("\n")[0].split(" ", 1)[1] for t in titles]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (.ci/run installs Debian's chromium)")
def test_reports_load_in_headless_chromium_without_errors(tmp_path, runs, tiny):
    pages = {"checkpoint": tmp_path / "c.html", "comparison": tmp_path / "m.html", "run": tmp_path / "r.html",
             "llm": tmp_path / "llm.html"}
    write_report([str(SAMPLES / "cnn_trained.safetensors")], pages["checkpoint"])
    write_report([str(SAMPLES / "cnn_untrained.safetensors"), str(SAMPLES / "cnn_trained.safetensors")], pages["comparison"])
    write_report([str(runs["cal"]), str(runs["tb"])], pages["run"])
    llm = llama_like()
    pages["llm"].write_text(checkpoint_report(llm))
    for kind, page in pages.items():
        profile = tmp_path / f"profile-{kind}"
        dom, measured = measure_in_chromium(page, profile)
        assert 'data-js-ready="1"' in dom, kind
        assert 'data-js-errors="0"' in dom, kind  # console errors, script errors (the measuring script's too)
        figs = {f["kind"].split()[1]: f for f in measured["figures"]}
        assert measured["content"] > 1000 and figs, kind
        for f in measured["figures"]:  # every hoverable figure spans the content column …
            assert abs(f["width"] - measured["content"]) <= 1, (kind, f["kind"], f["width"], measured["content"])
            assert f["hits"] and all(h["hit"] for h in f["hits"]), (kind, f["kind"])  # … and each area is reachable
        if kind in ("checkpoint", "llm"):
            a = analyze(SAMPLES / "cnn_trained.safetensors") if kind == "checkpoint" else llm
            names = [r.name for r in a.layers]
            assert first_lines(h["title"] for h in figs["alpha-figure"]["hits"]) == names  # every layer, model order
        if kind == "llm":
            assert sorted(first_lines(h["title"] for h in figs["block-heatmap"]["hits"])) == sorted(names[:-1])
        if kind == "run":
            assert len(figs["spread-figure"]["hits"]) == 2 and len(figs["alpha-figure"]["hits"]) == 4
        if kind == "checkpoint":  # the check can fail: a page with a broken script is caught
            broken = tmp_path / "broken.html"
            broken.write_text(page.read_text().replace("</body>", "<script>notDefined();</script></body>"))
            bad = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}-b", "--dump-dom", broken.as_uri()],
                                 capture_output=True, text=True, timeout=120)
            assert 'data-js-errors="1"' in bad.stdout
        shot = tmp_path / f"{kind}.png"
        subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1280,2000",
                        f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
        assert shot.is_file() and shot.stat().st_size > 20_000, kind


def test_hundreds_of_layers_stay_usable():
    import torch

    torch.manual_seed(0)
    state = {f"blocks.{i}.fc.weight": torch.randn(48, 32) for i in range(120)}
    html = checkpoint_report(analyze(state, keep_spectra=True))
    assert html.count("<details") == 120 and html.count("<details open") == 6  # collapsed beyond the first few
    assert len(html) < 120 * 20_000  # ~13 KB a layer: a few MB for hundreds of layers


LLAMA_MATRICES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj"]


def llama_like(n_blocks: int = 43, fit: str = "ks"):
    """A synthetic LLaMA-like analysis (43 blocks × 7 matrices and lm_head: 302 layers), rows built from one
    measured row with other names and alphas."""
    import torch

    from tbdiag.analysis.core import Analysis
    from tbdiag.analysis.options import AnalyzeOptions
    from tbdiag.esd.metrics import layer_result, summarize

    torch.manual_seed(0)
    w = torch.randn(64, 64, dtype=torch.float64)
    base = layer_result("x", "linear", (64, 64), torch.linalg.eigvalsh(w @ w.T))
    names = [f"model.layers.{b}.{m}" for b in range(n_blocks) for m in LLAMA_MATRICES] + ["lm_head"]
    rows = tuple(dataclasses.replace(base, name=n, shape=(4096, 4096), alpha=2.0 + 4.0 * ((i * 37) % 101) / 101)
                 for i, n in enumerate(names))
    return Analysis("llama-like.safetensors", "safetensors", 7 * 10 ** 9, AnalyzeOptions(fit=fit), rows,
                    summarize(rows, fit))


def figure_titles(page: str, kind: str) -> list[str]:
    """The hover titles of one figure of a page (``kind``: its class), unescaped, in order."""
    (fig,) = re.findall(rf'<figure class="fig {kind}".*?</figure>', page, re.S)
    return [html_lib.unescape(t) for t in re.findall(r"<title>(.*?)</title>", fig, re.S)]


def test_a_long_model_gets_block_ticks_and_a_block_by_matrix_heat_map():
    from matplotlib.figure import Figure

    from tbdiag.report.alphas import draw_alpha

    a = llama_like()
    names = [r.name for r in a.layers]
    assert len(names) == 302
    page = checkpoint_report(a)
    titles = figure_titles(page, "alpha-figure")
    assert [t.split("\n")[0] for t in titles] == [f"#{i + 1} {n}" for i, n in enumerate(names)]
    assert f"alpha {a.layers[5].alpha:.3f} ± " in titles[5] and "4096×4096" in titles[5]
    cells = figure_titles(page, "block-heatmap")
    assert sorted(t.split("\n")[0].split(" ", 1)[1] for t in cells) == sorted(names[:-1])  # lm_head: no block
    assert "<h2>Alpha by block and matrix type</h2>" in page
    fig = Figure()
    draw_alpha(fig, [{"name": n, "alpha": r.alpha, "alpha_err": r.alpha_err} for n, r in zip(names, a.layers)], True)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert 10 <= len(ticks) <= 48 and not set(ticks) & set(names) and ticks[:3] == ["0", "2", "4"]
    short = checkpoint_report(analyze(SAMPLES / "cnn_trained.safetensors"))
    assert "block-heatmap" not in short and len(figure_titles(short, "alpha-figure")) == 4
    assert [t.split("\n")[0] for t in figure_titles(short, "alpha-figure")] == [
        "#1 features.0", "#2 features.3", "#3 features.6", "#4 fc"]


def test_hover_titles_and_tables_escape_names_and_keep_model_order():
    import torch

    torch.manual_seed(0)
    names = ["z.first", "<script>alert(1)</script>", "$x$", "a.last"]
    page = checkpoint_report(analyze({f"{n}.weight": torch.randn(64, 56 + 2 * i) for i, n in enumerate(names)},
                                     keep_spectra=True))
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert [t.split("\n")[0] for t in figure_titles(page, "alpha-figure")] == [f"#{i + 1} {n}" for i, n in enumerate(names)]
    table = page[page.index('id="layers-a0"'):]
    rows = re.findall(r'<td class="text" data-v="\d+">\d+</td><td class="text">(.*?)</td>', table)
    assert [html_lib.unescape(r) for r in rows] == names  # model order, not alphabetical


def png_and_rects(fig_html: str):
    """The figure's PNG as an (H, W, 3) array of 0–255 values, and its hover rects (x, y, w, h, title)."""
    import base64
    import io

    from matplotlib.image import imread

    src = re.search(r'src="data:image/png;base64,([^"]+)"', fig_html).group(1)
    png = (imread(io.BytesIO(base64.b64decode(src)), format="png")[..., :3] * 255).round()
    rects = [(float(x), float(y), float(w), float(h), html_lib.unescape(t)) for x, y, w, h, t in re.findall(
        r'<rect x="([^"]+)" y="([^"]+)" width="([^"]+)" height="([^"]+)"[^>]*><title>(.*?)</title>', fig_html, re.S)]
    return png, rects


def test_hover_areas_lie_on_their_points_and_cells():
    """Each layer's column holds its marker, and each heat-map cell's area lies on that cell's colour."""
    from matplotlib import colormaps

    from tbdiag.report.alphas import alpha_by_layer
    from tbdiag.report.hover import heatmap

    alphas = [2.0, 7.5, 3.0, 6.5, 2.5, 5.0]
    rows = [{"name": f"l{i}", "alpha": a, "alpha_err": 0.0} for i, a in enumerate(alphas)]
    png, rects = png_and_rects(alpha_by_layer(rows, bands=False))
    assert [r[4].split("\n")[0] for r in rects] == [f"#{i + 1} l{i}" for i in range(6)]
    marker = np.all(np.abs(png - [31, 78, 121]) <= 12, axis=2)  # the points' colour, #1f4e79
    centres = []
    for x, y, w, h, _ in rects:
        ys, _ = np.nonzero(marker[:, int(x):int(x + w)])
        assert len(ys) and y <= ys.min() and ys.max() <= y + h  # the point lies inside its layer's area
        centres.append(ys.mean())
    assert np.argsort(centres).tolist() == np.argsort(alphas)[::-1].tolist()  # higher alpha: higher up
    matrix = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    titles = [[f"r{i}c{j}" for j in range(3)] for i in range(2)]
    png, rects = png_and_rects(heatmap(matrix, ["r0", "r1"], ["c0", "c1", "c2"], "t", titles, "alt"))
    assert [r[4] for r in rects] == [t for row in titles for t in row]
    for x, y, w, h, title in rects:
        i, j = int(title[1]), int(title[3])
        colour = np.array(colormaps["viridis"]((matrix[i, j] - 1) / 5)[:3]) * 255
        assert np.abs(png[int(y + h / 2), int(x + w / 2)] - colour).max() <= 3, title


def multiplier_rows(page: str) -> list[tuple[str, float, float]]:
    table = page[page.index('<table class="sortable" id="multipliers-'):]
    table = table[:table.index("</table>")]
    return [(html_lib.unescape(name), float(alpha), float(mult)) for name, alpha, mult in re.findall(
        r'<td class="text">([^<]*)</td><td data-v="\d+">\d+</td><td data-v="([^"]+)">[^<]*</td>'
        r'<td class="multiplier" data-v="([^"]+)">', table)]


def test_report_multipliers_are_what_tbdiag_recommend_gives(tmp_path):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(3)
    path = tmp_path / "m.safetensors"
    save_file({f"layer{i}.weight": torch.randn(96, 64 + 8 * i) @ torch.diag(torch.rand(64 + 8 * i) ** (i + 1))
               for i in range(7)}, path)
    res = runner.invoke(app, ["recommend", str(path), "--out", "-"])
    assert res.exit_code == 0, res.output
    expected = [(n, e["alpha"], e["multiplier"]) for n, e in json.loads(res.stdout)["layers"].items()]
    assert len(expected) == 5
    out = tmp_path / "r.html"
    assert runner.invoke(app, ["report", str(path), "--out", str(out)]).exit_code == 0  # a ks analysis
    page = out.read_text()
    assert "alpha &lt; 2 (ks fit)" in page and "same-as-recommend" in page
    assert [n for n, _, _ in multiplier_rows(page)] == [n for n, _, _ in expected]  # model order
    assert multiplier_rows(page) == [(n, pytest.approx(x), pytest.approx(m)) for n, x, m in expected]
    for fit, same in (("ks", False), ("median", True)):  # saved analyses keep no eigenvalues to refit
        saved = tmp_path / f"{fit}.json"
        assert runner.invoke(app, ["analyze", str(path), "--fit", fit, "-q", "--json", str(saved)]).exit_code == 0
        assert write_report([str(saved)], tmp_path / f"{fit}.html") == "checkpoint"
        page = (tmp_path / f"{fit}.html").read_text()
        assert ("same-as-recommend" in page) == same and ("NOT the numbers tbdiag recommend gives" in page) != same
        if same:
            assert multiplier_rows(page) == [(n, pytest.approx(x), pytest.approx(m)) for n, x, m in expected]
    other = checkpoint_report(analyze(path, keep_spectra=True, xmin_pos=3.0))  # an option recommend does not use
    assert "differs-from-recommend" in other and "xmin_pos 3.0 (recommend: 2.0)" in other


def test_run_report_shows_alpha_spread_over_epochs(runs, tmp_path):
    out = tmp_path / "run.html"
    assert write_report([str(runs["tb"])], out) == "run"
    page = out.read_text()
    records = [json.loads(line) for line in (runs["tb"] / "metrics.jsonl").read_text().splitlines()]
    table = page[page.index('<table class="sortable spread"'):]
    found = re.findall(r'<tr><td data-v="(\d+)">\d+</td><td data-v="(\d+)">\d+</td><td data-v="([^"]+)">', table)
    assert len(found) == len(records) == 2
    for (epoch, n, std), r in zip(found, records):
        alphas = [v["alpha"] for v in r["layers"].values() if v.get("alpha") is not None]
        assert int(epoch) == r["epoch"] and int(n) == len(alphas) >= 2
        assert float(std) == pytest.approx(statistics.pstdev(alphas))  # ddof 0, as the analysis summary
    assert f'<td data-v="{std}">{float(std):.3f}</td></tr>' in page  # the runs table: the last epoch's
    assert [t.split("\n")[0] for t in figure_titles(page, "spread-figure")] == ["tb, epoch 1", "tb, epoch 2"]


def test_comparison_of_same_named_files_keeps_them_apart(tmp_path):
    from tbdiag.report.render import comparison_report

    a = analyze(SAMPLES / "cnn_trained.safetensors")
    b = analyze(SAMPLES / "cnn_untrained.safetensors")
    html = comparison_report([("model.safetensors", a), ("model.safetensors", b)])
    assert f"model.safetensors ({a.source})" in html and f"model.safetensors ({b.source})" in html


# The HT-SR bands are calibrated on the ks fit: the report shows them, and flags, only for ks alphas.
def test_report_shows_bands_only_for_the_ks_fit(tmp_path):
    untrained = str(SAMPLES / "cnn_untrained.safetensors")
    ks, median = tmp_path / "ks.html", tmp_path / "median.html"
    assert runner.invoke(app, ["report", untrained, "--out", str(ks)]).exit_code == 0  # ks by default
    html = ks.read_text()
    assert "alpha &gt; 6 (ks fit)" in html and "Possibly under-trained (alpha &gt; 6, ks fit): features.6" in html
    assert '<tr class="under">' in html and "not shown" not in html
    assert runner.invoke(app, ["report", untrained, "--fit", "median", "--out", str(median)]).exit_code == 0
    html = median.read_text()
    assert "HT-SR bands</div><div class=\"v\">not shown" in html and "calibrated on the <code>ks</code> fit" in html
    assert '<tr class="under">' not in html and '<tr class="over">' not in html and "Possibly" not in html
    saved = tmp_path / "median.json"
    assert runner.invoke(app, ["analyze", untrained, "--fit", "median", "-q", "--json", str(saved)]).exit_code == 0
    assert write_report([str(saved)], tmp_path / "from_json.html") == "checkpoint"
    assert "not shown" in (tmp_path / "from_json.html").read_text()
    both = tmp_path / "both.html"
    assert write_report([untrained, str(saved)], both, fit="ks") == "comparison"
    html = both.read_text()
    assert "<td class=\"text\">median</td>" in html and "n/a" in html and "bands-note" in html


# A saved analysis is input like any file: every malformed document is a one-line error.
@pytest.fixture(scope="module")
def saved_doc(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "a.json"
    assert runner.invoke(app, ["analyze", str(SAMPLES / "cnn_trained.safetensors"), "-q", "--json", str(path)]).exit_code == 0
    return json.loads(path.read_text())


def _broken(doc, change):
    doc = json.loads(json.dumps(doc))
    change(doc)
    return doc


MALFORMED = {
    "alpha is a string": (lambda d: d["layers"][1].update(alpha="2.5"), 'layers[1].alpha is "2.5", not a number or null'),
    "D is a list": (lambda d: d["layers"][1].update(D=[1]), "layers[1].D is [1], not a number"),
    "alpha is true": (lambda d: d["layers"][2].update(alpha=True), "layers[2].alpha is true, not a number"),
    "n_evals is a float": (lambda d: d["layers"][0].update(n_evals=9.5), "layers[0].n_evals is 9.5, not a whole number"),
    "n_tail is negative": (lambda d: d["layers"][0].update(n_tail=-1), "layers[0].n_tail is -1, not a whole number"),
    "shape is a string": (lambda d: d["layers"][0].update(shape="32x1"), 'layers[0].shape is "32x1", not a list'),
    "shape holds a string": (lambda d: d["layers"][0].update(shape=[32, "1"]), "layers[0].shape[1]"),
    "name is a number": (lambda d: d["layers"][0].update(name=3), "layers[0].name is 3, not a string"),
    "status missing": (lambda d: d["layers"][0].pop("status"), "layers[0].status is missing"),
    "a layer is null": (lambda d: d["layers"].__setitem__(0, None), "layers[0] is null, not an object"),
    "layers is an object": (lambda d: d.update(layers={}), "layers is {}, not a list"),
    "no layers": (lambda d: d.update(layers=[]), "layers is [], not a list of layers"),
    "layers missing": (lambda d: d.pop("layers"), "layers is missing"),
    "options is a list": (lambda d: d.update(options=[]), "options is [], not an object"),
    "fit missing": (lambda d: d["options"].pop("fit"), "options.fit is missing"),
    "unknown fit": (lambda d: d["options"].update(fit="magic"), 'options.fit is "magic", not one of median, ks, peak'),
    "xmin_pos is a string": (lambda d: d["options"].update(xmin_pos="2"), 'options.xmin_pos is "2", not a number'),
    "xmin_pos is null": (lambda d: d["options"].update(xmin_pos=None), "options.xmin_pos is null, not a number"),
    "include is a string": (lambda d: d["options"].update(include="a*"), 'options.include is "a*", not a list'),
    "quirk is a string": (lambda d: d["options"].update(peak_lower_bound_quirk="no"), "not true or false"),
    "source missing": (lambda d: d.pop("source"), "source is missing, not a string"),
    "n_params is a string": (lambda d: d.update(n_params="many"), 'n_params is "many"'),
    "timing is a list": (lambda d: d.update(timing=[]), "timing is [], not an object"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_analysis_json_is_one_line(saved_doc, tmp_path, case):
    change, message = MALFORMED[case]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_broken(saved_doc, change)))
    out = tmp_path / "r.html"
    res = runner.invoke(app, ["report", str(bad), "--out", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: ") and message in lines[0], res.stderr
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ("", "not a JSON file"), ("{", "not a JSON file"), ("[" * 100_000, "not a JSON file"), ("[]", "an empty list"),
    ("[1]", "schema is 'int'"), ('"x"', "schema is 'str'"), ("\udcff".encode("utf-8", "surrogatepass"), "not a JSON file")])
def test_unreadable_analysis_files_are_one_line(tmp_path, text, message):
    bad = tmp_path / "bad.json"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    res = runner.invoke(app, ["report", str(bad), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output


def test_a_saved_analysis_reads_back_unchanged(saved_doc, tmp_path):
    from tbdiag.analysis.export import analysis_from_dict, to_json

    again = json.loads(to_json([analysis_from_dict(saved_doc)]))
    assert again == saved_doc
    # a summary that disagrees with the rows is recomputed from them
    recomputed = analysis_from_dict(_broken(saved_doc, lambda d: d.update(summary="x"))).summary
    assert recomputed == dict(saved_doc["summary"], skipped={})


def test_a_hugging_face_folder_is_a_checkpoint_not_a_training_run(tmp_path):
    """Its config.json is a model config; a run folder is config.json beside checkpoints/."""
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(SAMPLES / "cnn_trained.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "cnn", "architectures": ["CNN"]}))
    res = runner.invoke(app, ["report", str(folder), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert "alpha per layer" in (tmp_path / "r.html").read_text()


# A run folder's metrics.jsonl is input too: what it lacks is shown as missing, with a warning; never a traceback.
def _run_copy(runs, tmp_path, edit):
    folder = tmp_path / "run"
    shutil.copytree(runs["tb"], folder)
    path = folder / "metrics.jsonl"
    path.write_text(edit(path.read_text().splitlines()))
    return folder


def test_report_of_a_run_with_missing_values_renders_them_as_missing(runs, tmp_path):
    records = [json.loads(line) for line in (runs["tb"] / "metrics.jsonl").read_text().splitlines()]

    def edit(lines):
        first, last = json.loads(lines[0]), json.loads(lines[1])
        del last["test_acc"]
        first["lr"] = "fast"
        first["layers"] = {name: {"alpha": "high", "lr": v["lr"]} for name, v in first["layers"].items()}
        return "\n".join(json.dumps(r) for r in (first, last)) + "\n"

    folder, out = _run_copy(runs, tmp_path, edit), tmp_path / "r.html"
    res = runner.invoke(app, ["report", str(folder), "--out", str(out)])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert "test_acc missing or not a number in epoch 2; shown as missing" in res.stderr
    assert "lr missing or not a number in epoch 1; shown as missing" in res.stderr
    assert "a layer's alpha or lr missing or not a number in epoch 1; shown" in res.stderr
    html = out.read_text()
    assert 'data-v="nan">-</td>' in html  # the final test accuracy: missing, not 0
    assert f">{records[0]['test_acc']:.4f}</td>" in html  # the best of what is there

    from tbdiag.runs.folder import read_metrics

    first, last = read_metrics(folder)
    assert math.isnan(first["lr"]) and math.isnan(last["test_acc"]) and last["lr"] == records[1]["lr"]
    assert all(v["alpha"] is None and v["lr"] == records[0]["layers"][n]["lr"] for n, v in first["layers"].items())
    assert first["layers"] and first["train_loss"] == records[0]["train_loss"]


def test_best_accuracy_skips_a_missing_first_epoch(runs, tmp_path):
    """max() keeps a leading nan: the best accuracy must be the best of what is there, whatever epoch lacks it."""
    records = [json.loads(line) for line in (runs["tb"] / "metrics.jsonl").read_text().splitlines()]

    def edit(lines):
        first = json.loads(lines[0])
        del first["test_acc"]
        return "\n".join([json.dumps(first), *lines[1:]]) + "\n"

    folder, out = _run_copy(runs, tmp_path, edit), tmp_path / "r.html"
    assert runner.invoke(app, ["report", str(folder), "--out", str(out)]).exit_code == 0
    best = max(r["test_acc"] for r in records[1:])
    assert f">{best:.4f}</td>" in out.read_text()


def test_report_of_a_run_with_malformed_lines(runs, tmp_path):
    """A last line cut short is skipped (a copy stopped mid-write); a broken line before it is one line, exit 2."""
    out = tmp_path / "r.html"
    folder = _run_copy(runs, tmp_path, lambda lines: "\n".join([lines[0], '{"epoch": 2, "train_loss": ']) + "\n")
    res = runner.invoke(app, ["report", str(folder), "--out", str(out)])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert "metrics.jsonl: skipped its last line, which is incomplete (JSONDecodeError" in res.stderr
    assert '<td data-v="1">1 / 2</td>' in out.read_text()  # the one readable epoch
    shutil.rmtree(folder)
    out.unlink()
    for middle in ('{"epoch": 0}', "[]", '{"epoch": 1, "train_loss": '):
        folder = _run_copy(runs, tmp_path, lambda lines: "\n".join([middle, lines[1]]) + "\n")
        res = runner.invoke(app, ["report", str(folder), "--out", str(out)])
        assert res.exit_code == 2 and "Traceback" not in res.output and not out.exists(), res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {folder / 'metrics.jsonl'}: line 1 is not an epoch "
                                                       "record (") and "; fix or remove that line" in lines[0], lines
        shutil.rmtree(folder)


@pytest.mark.parametrize("raw", [{"epoch": 0}, {"epoch": "1"}, {"epoch": True}, {"epoch": 1.0}, [], None])
def test_an_epoch_record_needs_a_whole_epoch(raw):
    from tbdiag.runs.config import epoch_record

    with pytest.raises(ValueError, match="not an epoch record"):
        epoch_record(raw)


def test_comparison_shows_no_changes_of_alpha_between_incomparable_analyses(tmp_path):
    """The diff rule: a ΔW analysis beside a W analysis (or two fits) are shown side by side, never differenced."""
    torch.manual_seed(0)
    base, ft = tmp_path / "base.safetensors", tmp_path / "ft.safetensors"
    w = {f"l{i}.weight": torch.randn(64, 48) for i in range(3)}
    save_file(w, base)
    save_file({k: v + 0.1 * torch.randn_like(v) for k, v in w.items()}, ft)
    for args, name in (([ft, "--base", base, "--fit", "median"], "delta.json"), ([ft, "--fit", "median"], "w.json"),
                       ([ft, "--fit", "ks"], "ks.json")):
        assert runner.invoke(app, ["analyze", *map(str, args), "--json", str(tmp_path / name), "-q"]).exit_code == 0
    for pair, why in ((("delta.json", "w.json"), "their metrics are not comparable"),
                      (("w.json", "ks.json"), "analysed with fit median")):
        out = tmp_path / "r.html"
        res = runner.invoke(app, ["report", *(str(tmp_path / f) for f in pair), "--out", str(out), "--overwrite"])
        assert res.exit_code == 0, res.output
        html = out.read_text()
        assert 'class="note not-comparable">Not shown:' in html and why in html and "change</th>" not in html
    res = runner.invoke(app, ["report", str(tmp_path / "w.json"), str(tmp_path / "w.json"), "--out", str(out)])
    assert "not-comparable" not in out.read_text()


def test_numbers_beyond_float_range_are_damage_not_tracebacks(runs, tmp_path):
    """10**400 is valid JSON but no float: a run's metrics show it as missing; an analysis names the field."""
    def edit(lines):
        first = json.loads(lines[0])
        first["test_acc"] = 10 ** 400
        first["layers"] = {name: {"alpha": 10 ** 400, "lr": v["lr"]} for name, v in first["layers"].items()}
        return "\n".join([json.dumps(first), *lines[1:]]) + "\n"

    folder, out = _run_copy(runs, tmp_path, edit), tmp_path / "r.html"
    res = runner.invoke(app, ["report", str(folder), "--out", str(out)])
    assert res.exit_code == 0 and "test_acc missing or not a number in epoch 1" in res.stderr, res.output
    torch.manual_seed(0)
    save_file({"fc.weight": torch.randn(64, 32)}, tmp_path / "m.safetensors")
    saved = tmp_path / "a.json"
    assert runner.invoke(app, ["analyze", str(tmp_path / "m.safetensors"), "--json", str(saved), "-q"]).exit_code == 0
    doc = json.loads(saved.read_text())
    doc["layers"][0]["alpha"] = 10 ** 400
    saved.write_text(json.dumps(doc))
    res = runner.invoke(app, ["report", str(saved), "--out", str(tmp_path / "b.html")])
    assert res.exit_code == 2 and "layers[0].alpha is 1000000" in res.stderr and "within float range" in res.stderr
    assert "Traceback" not in res.output
