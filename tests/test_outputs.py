"""Output files of every command: never an input, checked before any work, written all or none."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tbdiag.cli import app
from tbdiag.errors import TbdiagError
from tbdiag.io.outputs import check_outputs, write_outputs

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(res, message):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.output


def no_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".keep"))]


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    save_file({f"l{i}.weight": torch.randn(64, 48) for i in range(4)}, path)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if an analysis starts: every refusal here must come before any work."""
    import tbdiag.analysis.core
    import tbdiag.report.render

    def forbidden(*args, **kwargs):
        raise AssertionError("analysis started before the outputs were checked")

    for module in (tbdiag.analysis.core, tbdiag.report.render):
        monkeypatch.setattr(module, "analyze", forbidden)


@pytest.mark.parametrize("command", [["analyze", "{ckpt}", "--json"], ["analyze", "{ckpt}", "--csv"],
                                     ["analyze", "{ckpt}", "--html"], ["analyze", "{ckpt}", "-q", "--json", "-", "--csv"],
                                     ["report", "{ckpt}", "--out"], ["recommend", "{ckpt}", "-o"]])
def test_an_output_that_is_the_input_is_refused_before_any_work(ckpt, no_work, command):
    before = ckpt.read_bytes()
    res = run(*[a.format(ckpt=ckpt) for a in command], ckpt)
    assert_refused(res, "is the input")
    assert ckpt.read_bytes() == before
    assert no_leftovers(ckpt.parent) == []


def test_other_spellings_of_the_input_are_refused(ckpt, no_work, monkeypatch, tmp_path):
    before = ckpt.read_bytes()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.json").symlink_to(ckpt)
    os.link(ckpt, tmp_path / "hard.csv")
    for args in ([ckpt.name, "--json", f"./sub/../{ckpt.name}"],  # a relative path
                 [ckpt, "--json", "link.json"],                 # a symlink to the input
                 [ckpt, "--csv", "hard.csv"],                   # a hard link to the input
                 ["link.json", "--csv", ckpt]):                 # the input named through a symlink
        assert_refused(run("analyze", *args), "is the input")
    assert ckpt.read_bytes() == before and (tmp_path / "link.json").is_symlink()


def test_files_of_an_input_folder_are_refused(tmp_path, no_work):
    folder = tmp_path / "hf"
    folder.mkdir()
    for i in (1, 2):
        save_file({f"l{i}.weight": torch.randn(32, 16)}, folder / f"model-0000{i}-of-00002.safetensors")
    shard = folder / "model-00001-of-00002.safetensors"
    before = shard.read_bytes()
    os.link(shard, tmp_path / "elsewhere.json")
    assert_refused(run("analyze", folder, "--json", shard), "part of the input")
    assert_refused(run("analyze", folder, "--csv", tmp_path / "elsewhere.json"), "part of the input")
    assert_refused(run("report", folder, "--out", shard), "part of the input")
    # a new file the folder's reader would pick up next time
    assert_refused(run("analyze", folder, "--json", folder / "analysis.json"), "inside the input folder")
    assert_refused(run("recommend", folder, "-o", folder / "extra.safetensors"), "inside the input folder")
    assert shard.read_bytes() == before and not (folder / "analysis.json").exists()


def test_every_file_of_a_model_folder_is_an_input(tmp_path, no_work):
    """A model folder's tokenizer files and card are part of it (prune copies them): never an output."""
    folder = tmp_path / "hf"
    (folder / "1_Pooling").mkdir(parents=True)
    save_file({"l1.weight": torch.randn(32, 16), "l2.weight": torch.randn(32, 16)}, folder / "model.safetensors")
    texts = {"vocab.txt": "a\nb\n", "README.md": "card", "1_Pooling/notes.md": "mean"}
    for rel, text in texts.items():
        (folder / rel).write_text(text)
    os.link(folder / "vocab.txt", tmp_path / "vocab-link.csv")
    (tmp_path / "card-link.html").symlink_to(folder / "README.md")
    for command in (["analyze", folder, "--csv", folder / "README.md"], ["analyze", folder, "--json", tmp_path / "vocab-link.csv"],
                    ["report", folder, "--out", tmp_path / "card-link.html"], ["recommend", folder, "-o", folder / "1_Pooling/notes.md"],
                    ["prune", folder, "--sparsity", "0.5", "--allocation-json", folder / "vocab.txt"]):
        assert_refused(run(*command), "part of the input")
    assert {rel: (folder / rel).read_text() for rel in texts} == texts


def test_report_out_in_a_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    for target in (run_dir / "metrics.jsonl", run_dir / "config.json"):
        before = target.read_text()
        assert_refused(run("report", run_dir, "--out", target), "part of the input")
        assert target.read_text() == before
    # a report beside the run's files is fine: nothing reads it
    assert check_outputs([run_dir / "report.html"], [run_dir]) == [(run_dir / "report.html").resolve()]


@pytest.mark.parametrize("case", ["folder", "missing folder", "same file twice", "html to stdout"])
def test_every_target_is_checked_before_any_work(ckpt, tmp_path, no_work, case):
    (tmp_path / "some_dir").mkdir()
    first = tmp_path / "a.json"
    targets, message = {
        "folder": (["--json", first, "--csv", tmp_path / "some_dir"], "is a folder"),
        "missing folder": (["--json", first, "--html", tmp_path / "no" / "r.html"], "does not exist"),
        "same file twice": (["--json", first, "--csv", tmp_path / "some_dir" / ".." / "a.json"], "names the same file"),
        "html to stdout": (["--json", first, "--html", "-"], "goes to a file"),
    }[case]
    assert_refused(run("analyze", ckpt, *targets), message)
    assert not first.exists()


def test_report_and_recommend_targets_are_checked(ckpt, tmp_path, no_work):
    (tmp_path / "d").mkdir()
    assert_refused(run("report", ckpt, "--out", tmp_path / "d"), "is a folder")
    assert_refused(run("report", ckpt, "--out", "-"), "goes to a file")
    assert_refused(run("recommend", ckpt, "-o", tmp_path / "nope" / "m.json"), "does not exist")


def test_outputs_are_written_together_and_through_symlinks(ckpt, tmp_path):
    old = tmp_path / "old.json"
    old.write_text("previous run")
    real = tmp_path / "real.csv"
    real.write_text("x")
    (tmp_path / "link.csv").symlink_to(real)
    res = run("analyze", ckpt, "-q", "--json", old, "--csv", tmp_path / "link.csv", "--html", tmp_path / "r.html")
    assert res.exit_code == 0, res.output
    assert json.loads(old.read_text())["schema"] == "tbdiag.analysis/v1"  # an output may replace an output
    assert (tmp_path / "link.csv").is_symlink() and real.read_text().startswith("source,")
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert no_leftovers(tmp_path) == []


def test_write_outputs_is_all_or_nothing_when_a_rename_fails(tmp_path, monkeypatch):
    kept, new, third = tmp_path / "kept.json", tmp_path / "new.csv", tmp_path / "third.html"
    kept.write_text("old")
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        if Path(dst) == third:
            raise OSError(28, "No space left on device", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(TbdiagError, match=r"third.html: cannot write .*nothing was written"):
        write_outputs([(kept, "new"), (new, "new"), (third, "new")])
    assert kept.read_text() == "old" and not new.exists() and not third.exists()
    assert Path(calls[0]) == kept and Path(calls[1]) == new  # the first two were renamed, then undone
    assert no_leftovers(tmp_path) == []
    monkeypatch.setattr(os, "replace", real_replace)
    write_outputs([(kept, "new"), (new, "new")])
    assert kept.read_text() == new.read_text() == "new" and no_leftovers(tmp_path) == []


def test_a_failed_write_leaves_earlier_outputs_alone(ckpt, tmp_path, monkeypatch):
    """`--json a.json --csv a.csv`: a failure while the second file is written leaves no a.json behind."""
    import tbdiag.io.outputs

    real_write = tbdiag.io.outputs._write_text

    def disk_full_for_csv(tmp, text):
        if ".a.csv." in tmp.name:
            raise OSError(28, "No space left on device", str(tmp))
        real_write(tmp, text)

    monkeypatch.setattr(tbdiag.io.outputs, "_write_text", disk_full_for_csv)
    assert_refused(run("analyze", ckpt, "--json", tmp_path / "a.json", "--csv", tmp_path / "a.csv"),
                   "a.csv: cannot write (No space left on device); nothing was written")
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "a.csv").exists()
    assert no_leftovers(tmp_path) == []


# Strings from files (layer names, paths) are data: never Rich markup, never matplotlib mathtext.
ODD_NAMES = ["first", "blk[/].fc", "bad$x^$", "[bold]x[/bold]", "last"]


@pytest.fixture
def odd_ckpt(tmp_path):
    torch.manual_seed(1)
    folder = tmp_path / "runs["
    folder.mkdir()
    path = folder / "]$y^$.safetensors"  # the path holds "[/]" and a broken mathtext
    save_file({f"{n}.weight": torch.randn(64, 56 + 4 * i) for i, n in enumerate(ODD_NAMES)}, path)
    return path


def test_odd_names_in_analyze_table_and_html(odd_ckpt, tmp_path):
    html = tmp_path / "r.html"
    res = run("analyze", odd_ckpt, "--html", html, "--json", tmp_path / "a.json")
    assert res.exit_code == 0, res.output
    for name in ODD_NAMES:
        assert name in res.stdout
    assert str(odd_ckpt) in res.stdout.replace("\n", "")
    page = html.read_text()
    assert "blk[/].fc" in page and "bad$x^$" in page and "[bold]x[/bold]" in page


def test_odd_names_in_recommend_table(odd_ckpt):
    res = run("recommend", odd_ckpt)
    assert res.exit_code == 0, res.output
    assert "blk[/].fc" in res.stdout and "bad$x^$" in res.stdout  # tuned (safetensors sort the names)


def test_odd_names_in_report_comparison(odd_ckpt, tmp_path):
    (tmp_path / "b[").mkdir()
    other = tmp_path / "b[" / "]$z^$.safetensors"
    torch.manual_seed(2)
    save_file({f"{n}.weight": torch.randn(64, 56 + 4 * i) for i, n in enumerate(ODD_NAMES)}, other)
    out = tmp_path / "c.html"
    res = run("report", odd_ckpt, other, "--out", out)
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert "ESDs of bad$x^$" in page and "]$z^$.safetensors" in page and "runs[/]$y^$" in page


def test_control_characters_in_names_and_paths_are_escaped(tmp_path):
    """A newline or a terminal escape sequence from a file never splits a line nor drives the terminal."""
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    save_file({"blk\nfc.weight": torch.randn(64, 48), "x\x1b[31mred.weight": torch.randn(64, 48)}, path)
    res = run("analyze", path)
    assert res.exit_code == 0, res.output
    assert "blk\\nfc" in res.stdout and "x\\x1b[31mred" in res.stdout and "\x1b" not in res.stdout
    res = run("analyze", tmp_path / "no\nsuch\x1b[2J.safetensors")
    assert_refused(res, "no\\nsuch\\x1b[2J.safetensors")
    res = run("recommend", path, "--map", "x\ny")  # a usage error
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1 and "'x\\ny' is not one of" in res.stderr, res.stderr


# --- One output rule: an existing checkpoint is never replaced unasked; text outputs never get checkpoint names.

def other_checkpoint(tmp_path: Path, name: str) -> Path:
    """A checkpoint that is not an input of the command (a typo's victim)."""
    path = tmp_path / name
    if name.endswith(".safetensors") or "." not in name:
        save_file({"w.weight": torch.ones(3, 3)}, path)
    else:
        torch.save({"w.weight": torch.ones(3, 3)}, path)
    return path


@pytest.mark.parametrize("option", ["--json", "--csv", "--html"])
@pytest.mark.parametrize("victim", ["other.safetensors", "other.pt", "weights_without_suffix"])
def test_analyze_never_replaces_an_existing_checkpoint(ckpt, tmp_path, no_work, option, victim):
    target = other_checkpoint(tmp_path, victim)
    before = target.read_bytes()
    res = run("analyze", ckpt, option, target)
    expected = "named like a checkpoint" if "." in victim else "is an existing checkpoint"
    assert_refused(res, expected)
    assert target.read_bytes() == before


def test_a_checkpoint_without_suffix_is_found_by_content_and_overwrite_replaces_it(ckpt, tmp_path):
    target = other_checkpoint(tmp_path, "weights_without_suffix")
    res = run("analyze", ckpt, "--json", target)
    assert_refused(res, "pass --overwrite to replace it")
    assert json.loads(run("analyze", ckpt, "--json", target, "--overwrite", "-q").exit_code == 0 and
                      target.read_text())["summary"]["n_layers"] == 4


def test_a_text_output_named_like_a_checkpoint_is_refused_even_when_new_or_with_overwrite(ckpt, tmp_path, no_work):
    res = run("analyze", ckpt, "--json", tmp_path / "new.pt", "--overwrite")
    assert_refused(res, "give it a .json, .csv or .html name")
    assert not (tmp_path / "new.pt").exists()


def test_earlier_text_outputs_may_still_be_replaced(ckpt, tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "plain").write_text("an earlier note")  # no suffix, not a checkpoint by content
    assert run("analyze", ckpt, "--json", tmp_path / "a.json", "--csv", tmp_path / "plain", "-q").exit_code == 0
    assert json.loads((tmp_path / "a.json").read_text())["summary"]["n_layers"] == 4
    assert (tmp_path / "plain").read_text().startswith("source,name,kind,")


def test_every_command_refuses_an_existing_checkpoint_as_output(ckpt, tmp_path, no_work):
    victim = other_checkpoint(tmp_path, "victim")
    before = victim.read_bytes()
    for args in (["recommend", ckpt, "-o", victim], ["report", ckpt, "--out", victim],
                 ["diff", ckpt, ckpt, "--json", victim], ["prune", ckpt, "--sparsity", "0.5", "--allocation-json", victim]):
        assert_refused(run(*args), "is an existing checkpoint")
        assert victim.read_bytes() == before


def test_prune_never_replaces_an_existing_checkpoint_unless_asked(ckpt, tmp_path):
    victim = other_checkpoint(tmp_path, "victim.safetensors")
    before = victim.read_bytes()
    assert_refused(run("prune", ckpt, "--sparsity", "0.5", "--out", victim), "pass --overwrite to replace it")
    assert victim.read_bytes() == before
    res = run("prune", ckpt, "--sparsity", "0.5", "--out", victim, "--overwrite", "--include-first-last", "--min-evals", "10")
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    pruned = load_file(victim)
    assert set(pruned) == {f"l{i}.weight" for i in range(4)}


def test_library_error_names_the_parameter_not_the_flag(tmp_path):
    victim = other_checkpoint(tmp_path, "victim.pt")
    with pytest.raises(TbdiagError) as err:
        check_outputs([victim], weights=[victim])
    assert "overwrite=True" in str(err.value) and "--overwrite" not in str(err.value)
    assert check_outputs([victim], weights=[victim], overwrite=True) == [victim.resolve()]


def test_train_report_is_checked_like_every_output(tmp_path):
    victim = other_checkpoint(tmp_path, "victim.html")  # a checkpoint by its content, whatever its name
    before = victim.read_bytes()
    res = run("train", "--out", tmp_path / "run", "--report", victim, "--epochs", "1")
    assert_refused(res, "is an existing checkpoint")
    assert victim.read_bytes() == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["model.gguf", "weights.h5", "model.onnx", "flax_model.msgpack", "arrays.npz", "A.PT",
                                  "B.SafeTensors"])
def test_weights_of_any_format_and_any_case_are_never_replaced(ckpt, tmp_path, no_work, name):
    """Formats tbdiag does not read are still model weights; suffixes compare in lower case."""
    victim = tmp_path / name
    victim.write_bytes(b"GGUF\x03\x00 opaque weights")
    res = run("analyze", ckpt, "--json", victim)
    assert_refused(res, "named like a checkpoint")
    assert victim.read_bytes() == b"GGUF\x03\x00 opaque weights"


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.json", "-", "report.txt"])
def test_train_report_is_refused_before_any_epoch_when_it_would_be_a_run_file(tmp_path, name):
    """--report names an HTML file; inside the run folder it must not be one of the run's own files."""
    out = tmp_path / "run"
    out.mkdir()
    report = name if name == "-" else out / name
    res = run("train", "--model", "mlp", "--data", "synthetic", "--epochs", "1", "--out", out, "--report", report)
    assert_refused(res, "the run report is an HTML file")
    assert list(out.iterdir()) == []  # nothing trained, nothing written
