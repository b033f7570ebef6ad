import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tbdiag.cli import app

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_analyze_sample_table():
    res = run("analyze", SAMPLES / "cnn_training_ckpt.pt")
    assert res.exit_code == 0, res.output
    for name in ("features.0", "features.3", "features.6", "fc", "too_few_evals", "mean alpha"):
        assert name in res.stdout


def test_json_and_csv_files(tmp_path):
    j, c = tmp_path / "a.json", tmp_path / "a.csv"
    res = run("analyze", SAMPLES / "cnn_trained.safetensors", "--fit", "ks", "--json", j, "--csv", c, "-q")
    assert res.exit_code == 0 and res.stdout == ""
    doc = json.loads(j.read_text())
    assert doc["schema"] == "tbdiag.analysis/v1" and doc["options"]["fit"] == "ks"
    layer = {l["name"]: l for l in doc["layers"]}["features.0"]
    assert layer["status"] == "too_few_evals" and layer["alpha"] is None and layer["n_evals"] == 9
    expected = {"name", "kind", "shape", "n_evals", "alpha", "alpha_err", "xmin", "D", "n_tail", "lambda_max",
                "fnorm2", "alpha_weighted", "log_norm", "log_spectral_norm", "log_alpha_norm", "stable_rank",
                "status", "warning"}
    assert set(layer) == expected
    rows = list(csv.DictReader(io.StringIO(c.read_text())))
    assert [r["name"] for r in rows] == [l["name"] for l in doc["layers"]]
    assert rows[0]["shape"] == "x".join(map(str, doc["layers"][0]["shape"]))


def test_json_to_stdout_is_pure_json_and_several_paths_give_several_results():
    res = run("analyze", SAMPLES / "cnn_untrained.safetensors", SAMPLES / "mlp_sharded", "--json", "-")
    assert res.exit_code == 0
    docs = json.loads(res.stdout)
    assert [d["format"] for d in docs] == ["safetensors", "safetensors-sharded"]
    assert "mean alpha" in res.stderr  # the table moved to stderr


def test_include_and_device_options():
    res = run("analyze", SAMPLES / "cnn_trained.safetensors", "--include", "features.*", "--device", "cpu", "--json", "-", "-q")
    assert [l["name"] for l in json.loads(res.stdout)["layers"]] == ["features.0", "features.3", "features.6"]


class Evil:
    pass


def make_bad_inputs(tmp: Path) -> dict[str, tuple[list, str]]:
    (tmp / "empty_dir").mkdir()
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "notes.txt").write_text("not weights\n")
    good = tmp / "good.safetensors"
    save_file({"fc.weight": torch.randn(30, 20)}, good)
    (tmp / "trunc.safetensors").write_bytes(good.read_bytes()[:-100])
    (tmp / "header.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    torch.save({"x": Evil()}, tmp / "code.pt")
    save_file({"bn.weight": torch.ones(3)}, tmp / "nolayers.safetensors")
    return {
        "missing": ([tmp / "nope.pt"], "no such file"),
        "empty folder": ([tmp / "empty_dir"], "no checkpoint found"),
        "empty file": ([tmp / "empty.pt"], "empty file"),
        "truncated": ([tmp / "trunc.safetensors"], "safetensors"),
        "corrupt header": ([tmp / "header.safetensors"], "corrupt safetensors"),
        "code pickle": ([tmp / "code.pt"], "--trust-pickle"),
        "not a checkpoint": ([tmp / "notes.txt"], "not a checkpoint"),
        "no layers": ([tmp / "nolayers.safetensors"], "no layers"),
        "bad fit": ([good, "--fit", "magic"], "unknown estimator"),
        "bad xmin": ([good, "--xmin-pos", "0.5"], "at least 1"),
        "bad device": ([good, "--device", "tpu"], "--device"),
        "both stdout": ([good, "--json", "-", "--csv", "-"], "only one of them"),
        "missing out folder": ([good, "--json", tmp / "no" / "dir" / "a.json"], "does not exist"),
        "second path bad": ([good, tmp / "empty.pt"], "empty file"),
    }


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path):
    cases = make_bad_inputs(tmp_path)
    out = tmp_path / "out.json"
    out.write_text("precious")
    for label, (args, message) in cases.items():
        extra = [] if "--json" in args else ["--json", out, "--csv", tmp_path / "new.csv"]
        res = run("analyze", *args, *extra)
        assert res.exit_code == 2, (label, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (label, res.stderr)
        assert "Traceback" not in res.output
        assert out.read_text() == "precious", label
        assert not (tmp_path / "new.csv").exists(), label
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu():
    res = run("analyze", SAMPLES / "cnn_trained.safetensors", "--device", "cuda")
    assert res.exit_code == 2 and "no CUDA GPU" in res.stderr


def test_python_dash_m_and_no_report_imports():
    code = ("import sys; sys.argv = ['tbdiag', 'analyze', sys.argv[1], '-q', '--json', '-'];"
            "from tbdiag.cli import main\n"
            "try:\n main()\nexcept SystemExit as e:\n assert e.code in (0, None)\n"
            "bad = [m for m in ('matplotlib', 'jinja2') if m in sys.modules]\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code, str(SAMPLES / "mlp_legacy.pth")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "torch-legacy"
    proc = subprocess.run([sys.executable, "-m", "tbdiag", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("tbdiag ")


def test_recommend_table_file_and_errors(tmp_path):
    out = tmp_path / "m.json"
    res = run("recommend", SAMPLES / "cnn_trained.safetensors", "--lr", "0.1", "--out", out)
    assert res.exit_code == 0, res.output
    assert "features.3" in res.stdout and "features.6" in res.stdout and "fc" not in res.stdout.split("features.6")[1]
    doc = json.loads(out.read_text())
    assert doc["schema"] == "tbdiag.multipliers/v1" and doc["default_multiplier"] == 1.0
    assert sorted(e["multiplier"] for e in doc["layers"].values()) == pytest.approx([0.5, 1.5])
    assert all(e["lr"] == pytest.approx(0.1 * e["multiplier"]) for e in doc["layers"].values())
    res = run("recommend", SAMPLES / "mlp_sharded", "--keep-first-last", "--min-evals", "5", "--map", "sqrt", "--out", "-")
    assert res.exit_code == 0 and set(json.loads(res.stdout)["layers"]) == {"net.1", "net.3", "net.5"}
    out.write_text("keep")
    for args, message in (([SAMPLES / "cnn_trained.safetensors", "--map", "cubic"], "unknown map"),
                          ([SAMPLES / "cnn_trained.safetensors", "--metric", "loss"], "--metric loss"),
                          ([SAMPLES / "mlp_sharded", "--min-evals", "500"], "no layer to tune"),
                          ([tmp_path / "missing.pt"], "no such file")):
        res = run("recommend", *args, "--out", out)
        assert res.exit_code == 2 and message in res.stderr, (args, res.stderr)
        assert out.read_text() == "keep"
