"""``tbdiag train``: train with TempBalance or the paper's baselines; resumable; DDP under torchrun."""

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from tbdiag.cli.common import FLAG, OVERWRITE_HELP, err_console, user_errors
from tbdiag.runs.config import CHOICES

RUN, DATA, OPT, TB, BASE = "Run", "Data", "Optimisation", "TempBalance", "Baselines"


def _choices(name: str, field: str) -> type[enum.Enum]:
    """A str-valued Enum of a TrainConfig field's names: ``--help`` lists them, a typo exits with code 2."""
    return enum.Enum(name, [(v, v) for v in CHOICES[field]], type=str)  # type: ignore[return-value]


Model, Method, Data = _choices("Model", "model"), _choices("Method", "method"), _choices("Data", "data")
TbMap, TbFit, TbMetric = _choices("TbMap", "tb_map"), _choices("TbFit", "tb_fit"), _choices("TbMetric", "tb_metric")


def train_command(
    out: Annotated[Optional[str], typer.Option("--out", metavar="DIR", help="Run folder to create (config, metrics.jsonl, checkpoints); must be new or empty.", rich_help_panel=RUN)] = None,
    resume: Annotated[Optional[str], typer.Option(metavar="DIR", help="Continue the run in this folder from its newest readable checkpoint.", rich_help_panel=RUN)] = None,
    model: Annotated[Optional[Model], typer.Option(help="Model (default resnet18).", rich_help_panel=RUN)] = None,
    method: Annotated[Optional[Method], typer.Option(help="TempBalance or a baseline (default tb).", rich_help_panel=RUN)] = None,
    init_from: Annotated[Optional[str], typer.Option(metavar="FILE", help="Start from the weights of this checkpoint (names must match).", rich_help_panel=RUN)] = None,
    multipliers: Annotated[Optional[str], typer.Option(metavar="FILE", help="Start with these TempBalance multipliers (tbdiag recommend --out).", rich_help_panel=RUN)] = None,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda or cuda:N.", rich_help_panel=RUN)] = "auto",
    report: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Rewrite this HTML run report after every epoch.", rich_help_panel=RUN)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", metavar=FLAG, help=OVERWRITE_HELP, rich_help_panel=RUN)] = False,
    data: Annotated[Optional[Data], typer.Option(help="Data set (default cifar10).", rich_help_panel=DATA)] = None,
    data_dir: Annotated[Optional[str], typer.Option(metavar="PATH", help="Folder (or .npz file) with the data set's files.", rich_help_panel=DATA)] = None,
    synthetic_size: Annotated[Optional[int], typer.Option(metavar="N", help="Training images of --data synthetic, ≥ 10 (default 512).", rich_help_panel=DATA)] = None,
    train_subset: Annotated[Optional[int], typer.Option(metavar="N", help="Train on a seeded sample of N images, every class in proportion (default 0: all).", rich_help_panel=DATA)] = None,
    epochs: Annotated[Optional[int], typer.Option(metavar="N", help="Epochs, ≥ 1 (default 200); with --resume, at least those done.", rich_help_panel=OPT)] = None,
    lr: Annotated[Optional[float], typer.Option(metavar="X", help="Initial lr, > 0 (default 0.1 ResNet, 0.05 others).", rich_help_panel=OPT)] = None,
    batch_size: Annotated[Optional[int], typer.Option(metavar="N", help="Batch size per process, ≥ 1 (default 128).", rich_help_panel=OPT)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(metavar="X", help="Weight decay, ≥ 0 (default 5e-4).", rich_help_panel=OPT)] = None,
    momentum: Annotated[Optional[float], typer.Option(metavar="X", help="SGD momentum, in [0, 1) (default 0.9).", rich_help_panel=OPT)] = None,
    seed: Annotated[Optional[int], typer.Option(metavar="N", help="Seed of init, subset, shuffling and augmentation (default 0).", rich_help_panel=OPT)] = None,
    width: Annotated[Optional[float], typer.Option(metavar="X", help="Channel width factor, > 0 (default 1).", rich_help_panel=OPT)] = None,
    tb_map: Annotated[Optional[TbMap], typer.Option(help="Map from metric to multiplier (default linear).", rich_help_panel=TB)] = None,
    tb_min_ratio: Annotated[Optional[float], typer.Option(metavar="X", help="Smallest multiplier, > 0 (default 0.5; 0.6 with tb+snr).", rich_help_panel=TB)] = None,
    tb_max_ratio: Annotated[Optional[float], typer.Option(metavar="X", help="Largest multiplier, ≥ the smallest (default 1.5; 1.4 with tb+snr).", rich_help_panel=TB)] = None,
    tb_every: Annotated[Optional[int], typer.Option(metavar="N", help="Rebalance every N epochs, 0: never (default 1).", rich_help_panel=TB)] = None,
    tb_fit: Annotated[Optional[TbFit], typer.Option(help="Power-law estimator (default median).", rich_help_panel=TB)] = None,
    tb_metric: Annotated[Optional[TbMetric], typer.Option(help="Layer metric (default alpha).", rich_help_panel=TB)] = None,
    snr_strength: Annotated[Optional[float], typer.Option(metavar="X", help="SNR coefficient, ≥ 0 (default 0.01).", rich_help_panel=BASE)] = None,
    sgdr_period: Annotated[Optional[int], typer.Option(metavar="N", help="SGDR first period in epochs, ≥ 1 (default 10).", rich_help_panel=BASE)] = None,
    sgdr_mult: Annotated[Optional[int], typer.Option(metavar="N", help="SGDR period multiplier, ≥ 1 (default 2).", rich_help_panel=BASE)] = None,
) -> None:
    """Train a model with TempBalance (or a baseline), writing a resumable run folder."""
    from tbdiag.runs.config import TrainConfig

    given = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in locals().items()
             if k in TrainConfig.__dataclass_fields__ and v is not None}
    with user_errors(), _options_named():
        from tbdiag.errors import TbdiagError

        for option, value in (("--out", out), ("--resume", resume)):
            if value is not None and not value.strip():  # Path("") would be the working folder
                raise TbdiagError(f"{option} is empty; name the run folder")
        config, folder = _config(given, None if out is None else Path(out), None if resume is None else Path(resume))
        if report is not None:
            from tbdiag.io.outputs import check_outputs

            if report.suffix.lower() not in (".html", ".htm") or str(report) == "-":
                raise TbdiagError(f"--report {report}: the run report is an HTML file; name it e.g. report.html")
            read = [p for p in (config.init_from, config.multipliers, folder) if p]  # the run's own files too
            (report,) = check_outputs([report], read, overwrite=overwrite)
        history = _train_with_progress(config, folder, device, resume is not None, report)
        if history:
            last = history[-1]
            err_console.print(f"done: epoch {last['epoch']}, test accuracy {last['test_acc']:.4f}, run folder {folder}",
                              markup=False)


@contextmanager
def _options_named() -> Iterator[None]:
    """Name the option, not the config field, in a configuration error (``--batch-size 0``, not ``batch_size 0``)."""
    from tbdiag.errors import TbdiagError
    from tbdiag.runs.config import ConfigError

    try:
        yield
    except ConfigError as exc:
        raise TbdiagError(f"--{exc.field.replace('_', '-')} {exc.value}: {exc.problem}") from None


def _config(given: dict, out: Path | None, resume: Path | None):  # noqa: ANN202 - (TrainConfig, Path)
    """The run's config and folder: a new one from the options, or the resumed run's (only --epochs may change)."""
    from tbdiag.errors import TbdiagError
    from tbdiag.runs.config import TrainConfig
    from tbdiag.runs.folder import read_config

    if resume is None:
        if out is None:
            raise TbdiagError("no run folder: pass --out DIR for a new run or --resume DIR to continue one")
        if (out / "config.json").exists():
            raise TbdiagError(f"--out {out}: already holds a run; continue it with --resume {out} or choose a new folder")
        return TrainConfig(**given), out
    if out is not None and out != resume:
        raise TbdiagError("--out and --resume name different folders; pass only --resume DIR")
    config = read_config(resume)
    saved = dataclasses.asdict(config)
    changed = {k: v for k, v in given.items() if saved[k] != v and k != "epochs"}
    if changed:
        raise TbdiagError(f"--resume {resume}: the run was made with a different configuration "
                          f"({', '.join(f'{k}={saved[k]!r}, not {v!r}' for k, v in changed.items())}); "
                          "drop those options or start a new --out folder")
    return dataclasses.replace(config, **given), resume  # only epochs can differ: extend a run


def _train_with_progress(config, folder: Path, device: str, resume: bool, report):  # noqa: ANN001, ANN202
    import logging

    from tbdiag.analysis.distributed import world
    from tbdiag.train.loop import train

    logging.getLogger("tbdiag.train.loop").setLevel(logging.INFO)
    if not sys.stderr.isatty():
        return train(config, folder, device=device, resume=resume, report=report)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("epoch", total=None)

        def step(epoch: int, b: int, n: int) -> None:
            if world()[0] == 0:
                bar.update(task, completed=b + 1, total=n, description=f"epoch {epoch + 1}/{config.epochs}")

        return train(config, folder, device=device, resume=resume, on_batch=step, report=report)
