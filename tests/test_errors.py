"""Library errors name parameters, never CLI flags; the CLI rewords them as flags."""

import pytest
import torch

import tbdiag
from tbdiag.analysis.options import AnalyzeOptions
from tbdiag.errors import TbdiagError
from tbdiag.esd.spectrum import resolve_device


class Evil:
    pass


@pytest.mark.parametrize("call, words, flag", [
    (lambda tmp: resolve_device("tpu"), "device tpu", "--device tpu"),
    (lambda tmp: AnalyzeOptions(xmin_pos=0.5), "xmin_pos 0.5", "--xmin-pos 0.5"),
    (lambda tmp: AnalyzeOptions(farms_per_dim=0), "farms_per_dim 0", "--farms-windows 0"),
    (lambda tmp: AnalyzeOptions(fit="hill"), "fit hill", "--fit hill"),
    (lambda tmp: tbdiag.analyze(tmp / "evil.pt"), "trust_pickle=True", "--trust-pickle"),
    (lambda tmp: tbdiag.analyze(tmp / "evil.pt", key="ema"), "check the key", "check --key"),
])
def test_library_words_and_cli_words(call, words, flag, tmp_path):
    torch.save({"model": {"w": torch.zeros(3, 3)}, "obj": Evil()}, tmp_path / "evil.pt")
    torch.save({"model": {"fc.weight": torch.randn(8, 8)}}, tmp_path / "plain.pt")
    if "key" in words:
        call = lambda tmp: tbdiag.analyze(tmp / "plain.pt", key="ema")  # noqa: E731
    with pytest.raises(TbdiagError) as info:
        call(tmp_path)
    message = str(info.value)
    assert words in message and "--" not in message
    assert flag in info.value.cli_message() and "\n" not in message


def test_a_pipe_is_refused_not_waited_on(tmp_path):
    """A FIFO given as a multipliers file or an .npz data set would block forever: refused in one line."""
    import os

    from typer.testing import CliRunner

    from tbdiag import load_multipliers
    from tbdiag.cli import app

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(TbdiagError, match="not a regular file"):
        load_multipliers(fifo)
    res = CliRunner().invoke(app, ["train", "--model", "mlp", "--data", "npz", "--data-dir", str(fifo), "--epochs", "1",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "not a regular file" in res.stderr, res.output
