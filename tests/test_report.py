import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tbdiag import analyze
from tbdiag.cli import app
from tbdiag.report.render import checkpoint_report, write_report
from tbdiag.train.loop import train
from tbdiag.train.run import TrainConfig

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
    empty_run.mkdir()
    (empty_run / "config.json").write_text(json.dumps({"model": "cnn"}))
    cases = [([tmp_path / "other.json"], "not tbdiag.analysis/v1"), ([tmp_path / "empty"], "empty folder"),
             ([empty_run], "no completed epoch"), ([runs["tb"], SAMPLES / "cnn_trained.safetensors"], "mixing"),
             ([tmp_path / "missing.json"], "no such file")]
    out = tmp_path / "r.html"
    for inputs, message in cases:
        res = runner.invoke(app, ["report", *map(str, inputs), "--out", str(out)])
        assert res.exit_code == 2 and message in res.stderr and "Traceback" not in res.output, (inputs, res.output)
        assert not out.exists()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (.ci/run installs Debian's chromium)")
def test_reports_load_in_headless_chromium_without_errors(tmp_path, runs, tiny):
    pages = {"checkpoint": tmp_path / "c.html", "comparison": tmp_path / "m.html", "run": tmp_path / "r.html"}
    write_report([str(SAMPLES / "cnn_trained.safetensors")], pages["checkpoint"])
    write_report([str(SAMPLES / "cnn_untrained.safetensors"), str(SAMPLES / "cnn_trained.safetensors")], pages["comparison"])
    write_report([str(runs["cal"]), str(runs["tb"])], pages["run"])
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
    for kind, page in pages.items():
        profile = tmp_path / f"profile-{kind}"
        dom = subprocess.run([CHROMIUM, *flags, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=120)
        assert 'data-js-ready="1"' in dom.stdout, (kind, dom.stderr[-2000:])
        assert 'data-js-errors="0"' in dom.stdout, kind
        if kind == "checkpoint":  # the check can fail: a page with a broken script is caught
            broken = tmp_path / "broken.html"
            broken.write_text(page.read_text().replace("</body>", "<script>notDefined();</script></body>"))
            bad = subprocess.run([CHROMIUM, *flags, f"--user-data-dir={profile}-b", "--dump-dom", broken.as_uri()],
                                 capture_output=True, text=True, timeout=120)
            assert 'data-js-errors="1"' in bad.stdout
        shot = tmp_path / f"{kind}.png"
        subprocess.run([CHROMIUM, *flags, f"--user-data-dir={profile}", "--window-size=1280,2000",
                        f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
        assert shot.is_file() and shot.stat().st_size > 20_000, kind


def test_hundreds_of_layers_stay_usable():
    import torch

    torch.manual_seed(0)
    state = {f"blocks.{i}.fc.weight": torch.randn(48, 32) for i in range(120)}
    html = checkpoint_report(analyze(state, keep_spectra=True))
    assert html.count("<details") == 120 and html.count("<details open") == 6  # collapsed beyond the first few
    assert len(html) < 120 * 20_000  # ~13 KB a layer: a few MB for hundreds of layers


def test_comparison_of_same_named_files_keeps_them_apart(tmp_path):
    from tbdiag.report.render import comparison_report

    a = analyze(SAMPLES / "cnn_trained.safetensors")
    b = analyze(SAMPLES / "cnn_untrained.safetensors")
    html = comparison_report([("model.safetensors", a), ("model.safetensors", b)])
    assert f"model.safetensors ({a.source})" in html and f"model.safetensors ({b.source})" in html
