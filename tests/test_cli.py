import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tbdiag.cli import app
from tbdiag.cli.common import Estimator, Fit, MapName, Metric, Precision, Unit

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
                "status", "warning",
                # MP bulk and spikes (always), randomised ESD and traps (null/[] unless --randomize): additive fields
                "mp_sigma", "mp_bulk_max", "num_spikes", "mp_softrank", "matrix_entropy",
                "rand_lambda_max", "rand_bulk_max", "rand_distance", "num_traps", "traps"}
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
        "bad xmin": ([good, "--xmin-pos", "0.5"], "at least 1"),
        "nan xmin": ([good, "--xmin-pos", "nan"], "--xmin-pos nan: must be a finite number"),
        "no peak bins": ([good, "--fit", "peak", "--peak-bins", "0"], "--peak-bins 0: needs 1 to 1,000,000 bins"),
        "inf conv norm": ([good, "--conv-norm", "inf"], "--conv-norm inf: must be a finite"),
        "zero conv norm": ([good, "--conv-norm", "0"], "--conv-norm 0.0: must be positive"),
        "min evals": ([good, "--min-evals", "1"], "--min-evals 1: must be at least 2 (a fit needs 2 eigenvalues)"),
        "farms windows": ([good, "--estimator", "farms", "--farms-windows", "0"], "--farms-windows 0"),
        "farms ratio": ([good, "--estimator", "farms", "--farms-ratio", "inf"], "--farms-ratio inf"),
        "farms window": ([good, "--estimator", "farms", "--farms-window", "-1"], "--farms-window -1"),
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
    assert "linear map of alpha, 0.5–1.5" in res.stdout
    doc = json.loads(out.read_text())
    assert doc["schema"] == "tbdiag.multipliers/v1" and doc["default_multiplier"] == 1.0 and doc["fit"] == "median"
    assert sorted(e["multiplier"] for e in doc["layers"].values()) == pytest.approx([0.5, 1.5])
    assert all(e["lr"] == pytest.approx(0.1 * e["multiplier"]) for e in doc["layers"].values())
    res = run("recommend", SAMPLES / "mlp_sharded", "--include-first-last", "--min-evals", "5", "--map", "sqrt", "--out", "-")
    assert res.exit_code == 0 and set(json.loads(res.stdout)["layers"]) == {"net.1", "net.3", "net.5"}
    res = run("recommend", SAMPLES / "mlp_sharded", "--include-first-last", "--min-evals", "5", "--map", "sqrt")
    assert "sqrt map of alpha, mean 1)" in res.stdout and "0.5–1.5" not in res.stdout  # sqrt ignores the ratios
    out.write_text("keep")
    for args, message in (([SAMPLES / "mlp_sharded", "--min-evals", "500"], "no layer to tune (Conv/Linear with ≥ 500 "
                           "eigenvalues, input and output layers excluded); --include-first-last or lower --min-evals"),
                          ([SAMPLES / "mlp_sharded", "--include", "zzz*"], "no layer to tune with --include 'zzz*' among "
                           "its 3 layers (net.1, net.3, net.5 …); check the patterns"),
                          ([tmp_path / "missing.pt"], "no such file"),
                          ([SAMPLES / "cnn_trained.safetensors", "--max-ratio", "inf"], "--max-ratio inf: must be a finite"),
                          ([SAMPLES / "cnn_trained.safetensors", "--min-ratio", "nan"], "--min-ratio nan: must be a finite"),
                          ([SAMPLES / "cnn_trained.safetensors", "--min-ratio", "0"], "need 0 < min ≤ max"),
                          ([SAMPLES / "cnn_trained.safetensors", "--min-ratio", "2", "--max-ratio", "1"], "2/1: need 0 < min"),
                          ([SAMPLES / "cnn_trained.safetensors", "--min-evals", "-1"], "--min-evals -1: must be at least 2 (a fit needs 2 eigenvalues)"),
                          ([SAMPLES / "cnn_trained.safetensors", "--lr", "0"], "--lr 0.0: must be positive"),
                          ([SAMPLES / "cnn_trained.safetensors", "--lr", "nan"], "--lr nan: must be a finite")):
        res = run("recommend", *args, "--out", out)
        assert res.exit_code == 2 and message in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
        assert out.read_text() == "keep"


CHOICES_OF = {"--fit": Fit, "--precision": Precision, "--estimator": Estimator, "--map": MapName, "--metric": Metric,
              "--unit": Unit}


@pytest.mark.parametrize("command, option, typo", [
    ("analyze", "--fit", "magic"), ("analyze", "--precision", "float16"), ("analyze", "--estimator", "half"),
    ("recommend", "--map", "cubic"), ("recommend", "--metric", "loss"), ("recommend", "--unit", "blocks"),
    ("recommend", "--fit", "KS"), ("report", "--fit", "mean")])
def test_choice_typos_exit_2_before_any_work(tmp_path, command, option, typo):
    out = tmp_path / "out.json"
    res = run(command, SAMPLES / "cnn_trained.safetensors", option, typo, "--out" if command != "analyze" else "--json", out)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert res.stderr.splitlines() == [f"error: Invalid value for '{option}': '{typo}' is not one of "
                                       f"{', '.join(repr(c.value) for c in CHOICES_OF[option])}; see 'tbdiag {command} --help'"]
    assert not out.exists()


@pytest.mark.parametrize("args, line", [
    (["analzye", "x"], "error: No such command 'analzye'. Did you mean 'analyze'? see 'tbdiag --help'"),
    (["analyze", "--nope", "x"], "error: No such option: --nope; see 'tbdiag analyze --help'"),
    (["recommend", "x", "--max-ratio"], "error: Option '--max-ratio' requires an argument; see 'tbdiag recommend --help'"),
    (["analyze", "x", "--peak-bins", "many"], "error: Invalid value for '--peak-bins': "),
])
def test_usage_errors_are_one_line_with_where_to_look(args, line):
    res = run(*args)
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1 and res.stderr.startswith(line), res.stderr
    assert "╭" not in res.output and "Usage:" not in res.output


def test_a_command_alone_still_shows_its_help():
    res = run("recommend")
    assert res.exit_code in (0, 2) and "Usage: tbdiag recommend" in res.output and "error" not in res.output


HELP_ENV = {"COLUMNS": "220", "TERMINAL_WIDTH": "220", "NO_COLOR": "1"}


@pytest.mark.parametrize("command", [[], ["analyze"], ["recommend"], ["report"]])
def test_help_lists_choices_and_our_own_metavars(command):
    res = runner.invoke(app, [*command, "--help"], env=HELP_ENV)
    assert res.exit_code == 0, res.output
    options = [line for line in res.stdout.splitlines() if re.search(r"│ +(\*? +)?--", line)]
    assert options
    for line in options:  # Typer's own type names (<int>, <bool>, <str> …) vary between versions
        assert not re.search(r"<[a-z]+>", line), line
    text = "\n".join(options)
    if command == ["analyze"]:
        assert "[median|ks|peak]" in text and "[float64|float32]" in text and "[full|farms]" in text
        assert re.search(r"--fit .*\[default: ks\]", text)
    if command == ["recommend"]:
        assert "[linear|sqrt|log2|step|sigmoid]" in text and "[layer|block]" in text
        assert "[alpha|alpha_weighted|spectral_norm]" in text and re.search(r"--fit .*default: median.*peak for --target sparsity", text)
    if command == ["report"]:
        assert re.search(r"--fit .*\[default: ks\]", text)
    if command == []:
        assert re.search(r"--verbose +-v +More log output", text)  # a count: no <int>


def test_choices_match_the_library():
    from tbdiag.analysis.options import PRECISIONS
    from tbdiag.cli.common import Fit, MapName, Metric, Precision
    from tbdiag.esd.powerlaw import FITS
    from tbdiag.allocation.maps import METRIC_FIELDS
    from tbdiag.allocation.maps import MAPS

    for enum, table in ((Fit, FITS), (Precision, PRECISIONS), (MapName, MAPS), (Metric, METRIC_FIELDS)):
        assert [m.value for m in enum] == list(table), enum


# The HT-SR bands are calibrated on the ks fit: flags and colours only for ks alphas.
def test_analyze_defaults_to_ks_and_flags_bands_only_for_ks():
    from rich.console import Console

    from tbdiag import analyze
    from tbdiag.analysis.options import AnalyzeOptions
    from tbdiag.cli.render import analysis_table

    assert AnalyzeOptions().fit == "ks"
    res = run("analyze", SAMPLES / "cnn_untrained.safetensors", "--json", "-")
    assert json.loads(res.stdout)["options"]["fit"] == "ks" and "fit=ks" in res.stderr
    assert "ks fit, possibly under-trained (alpha > 6): 1  features.6" in res.stderr and "not shown" not in res.stderr
    res = run("analyze", SAMPLES / "cnn_untrained.safetensors", "--fit", "median")
    assert "possibly under-trained (alpha > 6):" not in res.stdout
    assert "not shown: they are calibrated on the ks fit, these alphas come from median" in res.stdout
    yellow = "\x1b[33m"
    for fit, coloured in (("ks", True), ("median", False), ("peak", False)):
        console = Console(force_terminal=True, color_system="standard", width=200)
        with console.capture() as capture:
            console.print(analysis_table(analyze(SAMPLES / "cnn_untrained.safetensors", fit=fit)))
        assert (yellow in capture.get()) == coloured, fit


# Maps, on values computed by hand.
def test_maps_on_hand_computed_values():
    from tbdiag.allocation.maps import USES_RATIOS, multipliers

    nan = float("nan")
    assert multipliers([2.0, 3.0, nan, 4.0], "linear", 0.5, 2.5) == pytest.approx([0.5, 1.5, 1.0, 2.5])
    assert multipliers([3.0, 3.0], "linear", 0.5, 2.5) == [1.0, 1.0]
    # step: ranks 0 … n−1, equal values share their average rank; m = lo + (hi − lo)·r/n
    assert multipliers([3.0, 1.0, 3.0, 2.0], "step", 0.5, 1.5) == pytest.approx([1.125, 0.5, 1.125, 0.75])
    assert multipliers([2.0, 2.0, 2.0], "step", 0.5, 1.5) == pytest.approx([0.5 + 1 / 3] * 3)
    assert multipliers([1.0, 4.0, 9.0], "step", 1.0, 3.0) == pytest.approx([1.0, 1 + 2 / 3, 1 + 4 / 3])
    # sqrt, log2: n·f(v)/Σf(v), whatever the ratios
    for lo, hi in ((0.5, 1.5), (0.9, 1.1)):
        assert multipliers([1.0, 4.0, 9.0], "sqrt", lo, hi) == pytest.approx([0.5, 1.0, 1.5])
        assert multipliers([2.0, 4.0, 8.0], "log2", lo, hi) == pytest.approx([0.5, 1.0, 1.5])
    assert USES_RATIOS == {"linear", "step", "sigmoid"}
    # sigmoid: 1 at the mean, lo and hi far below and above it; no overflow for values far apart
    assert multipliers([0.0, 10.0, 20.0], "sigmoid", 0.5, 1.5) == pytest.approx([0.5, 1.0, 1.5])
    assert multipliers([0.0, 1e6], "sigmoid", 0.5, 2.0) == pytest.approx([0.5, 2.0])


@pytest.mark.parametrize("args, message", [
    (([1.0, 2.0], "linear", 0.5, float("inf")), "need finite numbers"),
    (([1.0, 2.0], "sigmoid", float("nan"), 1.5), "need finite numbers"),
    (([1.0, 2.0], "step", 0.0, 1.5), "0 < min_ratio ≤ max_ratio"),
    (([1.0, 2.0], "linear", 2.0, 1.0), "0 < min_ratio ≤ max_ratio"),
    (([1.0, 2.0], "cubic", 0.5, 1.5), "unknown map"),
    (([0.0, 2.0], "sqrt", 0.5, 1.5), "use the linear map"),
    (([1.0, 2.0], "log2", 0.5, 1.5), "use the linear map")])
def test_maps_refuse_bad_input_without_naming_cli_flags(args, message):
    from tbdiag.errors import TbdiagError
    from tbdiag.allocation.maps import multipliers

    with pytest.raises(TbdiagError) as info:
        multipliers(*args)
    assert message in str(info.value) and "--" not in str(info.value)


def test_alpha_spread_in_the_json_the_table_footer_and_the_report_cards(tmp_path):
    """alpha_std: the population std (ddof 0) of the fitted layers' alphas, everywhere the summary shows."""
    import statistics

    res = run("analyze", SAMPLES / "mlp_sharded", "--fit", "median", "--json", tmp_path / "a.json", "--html",
              tmp_path / "a.html")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "a.json").read_text())
    alphas = [row["alpha"] for row in doc["layers"] if row["status"] == "ok"]
    assert len(alphas) >= 2 and doc["summary"]["alpha_std"] == pytest.approx(statistics.pstdev(alphas))
    assert f"alpha spread (std) {doc['summary']['alpha_std']:.3f}" in res.stdout
    html = (tmp_path / "a.html").read_text()
    assert f'alpha spread (std)</div><div class="v">{doc["summary"]["alpha_std"]:.2f}<' in html


def test_first_last_flag_has_one_name_and_one_sense_and_old_spellings_still_work():
    """--include-first-last (include_first_last=True): the input and output layers are tuned or pruned too."""
    args = (SAMPLES / "mlp_sharded", "--min-evals", "5", "--out", "-")
    new, old, without = (run("recommend", *args, *flag) for flag in (["--include-first-last"], ["--keep-first-last"], []))
    assert new.exit_code == old.exit_code == 0 and json.loads(new.stdout) == json.loads(old.stdout)
    assert without.exit_code == 0 and len(json.loads(new.stdout)["layers"]) > len(json.loads(without.stdout)["layers"])


@pytest.mark.parametrize("command", [["recommend"], ["prune", "--sparsity", "0.5", "--plan-only"]])
def test_min_evals_has_one_rule_reported_with_the_flag(command):
    """The selection rule (TuneOptions) is the one place min_evals is checked; the CLI names its flag."""
    res = run(command[0], SAMPLES / "mlp_sharded", *command[1:], "--min-evals", "1")
    assert res.exit_code == 2 and res.stderr.strip() == (
        "error: --min-evals 1: must be at least 2 (a fit needs 2 eigenvalues)"), res.output


@pytest.mark.parametrize("args, message", [
    (["analyze", ""], "the checkpoint path is empty"),
    (["recommend", ""], "the checkpoint path is empty"),
    (["diff", "", str(SAMPLES / "mlp_sharded")], "the checkpoint path is empty"),
    (["report", "", "--out", "r.html"], "the checkpoint path is empty"),
    (["analyze", str(SAMPLES / "mlp_sharded"), "--json", ""], "an output path is empty"),
    (["train", "--out", "", "--epochs", "1"], "--out is empty"),
])
def test_an_empty_path_names_no_file(args, message, tmp_path, monkeypatch):
    """Path("") is the working folder: an empty path is refused, never read or written as that folder."""
    monkeypatch.chdir(tmp_path)
    res = run(*args)
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and message in res.stderr, res.output
    assert list(tmp_path.iterdir()) == []


def test_recommend_sparsity_takes_prunes_max_sparsity():
    """The allocator's bound is an option of recommend too (its message names --max-sparsity)."""
    res = run("recommend", SAMPLES / "mlp_sharded", "--target", "sparsity", "--sparsity", "0.5", "--max-sparsity", "0.52",
              "--include-first-last", "--min-evals", "10", "--out", "-")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["parameters"]["max_sparsity"] == 0.52
    assert max(g["sparsity"] for g in doc["layers"].values()) == pytest.approx(0.52)
