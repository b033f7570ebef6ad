"""``tbdiag train``: train with TempBalance or the paper's baselines; resumable; DDP under torchrun."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tbdiag.cli.common import err_console, user_errors

RUN, DATA, OPT, TB, BASE = "Run", "Data", "Optimisation", "TempBalance", "Baselines"


def train_command(
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder to create (config, metrics.jsonl, checkpoints).", rich_help_panel=RUN)] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this folder from its last checkpoint.", rich_help_panel=RUN)] = None,
    model: Annotated[Optional[str], typer.Option(help="resnet18, resnet34, vgg16, vgg19, cnn or mlp.", rich_help_panel=RUN)] = None,
    method: Annotated[Optional[str], typer.Option(help="tb, cal, snr, tb+snr or sgdr.", rich_help_panel=RUN)] = None,
    init_from: Annotated[Optional[str], typer.Option(help="Start from the weights of this checkpoint (names must match).", rich_help_panel=RUN)] = None,
    multipliers: Annotated[Optional[str], typer.Option(help="Start with these TempBalance multipliers (tbdiag recommend --out).", rich_help_panel=RUN)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=RUN)] = "auto",
    report: Annotated[Optional[Path], typer.Option(help="Rewrite this HTML run report after every epoch.", rich_help_panel=RUN)] = None,
    data: Annotated[Optional[str], typer.Option(help="cifar10, cifar100, mnist, svhn, folder, npz or synthetic.", rich_help_panel=DATA)] = None,
    data_dir: Annotated[Optional[str], typer.Option(help="Folder (or .npz file) with the data set's files.", rich_help_panel=DATA)] = None,
    synthetic_size: Annotated[Optional[int], typer.Option(help="Training images of --data synthetic.", rich_help_panel=DATA)] = None,
    train_subset: Annotated[Optional[int], typer.Option(help="Use only the first N training images.", rich_help_panel=DATA)] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs [default: 200].", rich_help_panel=OPT)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Initial lr [default: 0.1 ResNet, 0.05 others].", rich_help_panel=OPT)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size [default: 128].", rich_help_panel=OPT)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay [default: 5e-4].", rich_help_panel=OPT)] = None,
    momentum: Annotated[Optional[float], typer.Option(help="SGD momentum [default: 0.9].", rich_help_panel=OPT)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of init, shuffling and augmentation [default: 0].", rich_help_panel=OPT)] = None,
    width: Annotated[Optional[float], typer.Option(help="Channel width factor [default: 1].", rich_help_panel=OPT)] = None,
    tb_map: Annotated[Optional[str], typer.Option(help="linear, sqrt, log2, step or sigmoid [default: linear].", rich_help_panel=TB)] = None,
    tb_min_ratio: Annotated[Optional[float], typer.Option(help="Smallest multiplier [default: 0.5; 0.6 with tb+snr].", rich_help_panel=TB)] = None,
    tb_max_ratio: Annotated[Optional[float], typer.Option(help="Largest multiplier [default: 1.5; 1.4 with tb+snr].", rich_help_panel=TB)] = None,
    tb_every: Annotated[Optional[int], typer.Option(help="Rebalance every N epochs [default: 1].", rich_help_panel=TB)] = None,
    tb_fit: Annotated[Optional[str], typer.Option(help="Estimator: median, ks or peak [default: median].", rich_help_panel=TB)] = None,
    tb_metric: Annotated[Optional[str], typer.Option(help="alpha, alpha_weighted or spectral_norm [default: alpha].", rich_help_panel=TB)] = None,
    snr_strength: Annotated[Optional[float], typer.Option(help="SNR coefficient [default: 0.01].", rich_help_panel=BASE)] = None,
    sgdr_period: Annotated[Optional[int], typer.Option(help="SGDR first period in epochs [default: 10].", rich_help_panel=BASE)] = None,
    sgdr_mult: Annotated[Optional[int], typer.Option(help="SGDR period multiplier [default: 2].", rich_help_panel=BASE)] = None,
) -> None:
    """Train a model with TempBalance (or a baseline), writing a resumable run folder."""
    from tbdiag.errors import TbdiagError
    from tbdiag.train.loop import check_config, train
    from tbdiag.train.run import TrainConfig, read_config

    given = {k: v for k, v in locals().items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    with user_errors():
        if resume is not None:
            if out is not None and out != resume:
                raise TbdiagError("--out and --resume name different folders; pass only --resume DIR")
            config = read_config(resume)
            saved = dataclasses.asdict(config)
            changed = {k: v for k, v in given.items() if saved[k] != v and k != "epochs"}
            if changed:
                raise TbdiagError(f"--resume {resume}: the run was made with a different configuration "
                                  f"({', '.join(f'{k}={saved[k]!r}, not {v!r}' for k, v in changed.items())}); "
                                  "drop those options or start a new --out folder")
            config = dataclasses.replace(config, **given)  # only epochs can differ: extend a finished run
            folder = resume
        else:
            if out is None:
                raise TbdiagError("no run folder: pass --out DIR for a new run or --resume DIR to continue one")
            if (out / "config.json").exists():
                raise TbdiagError(f"--out {out}: already holds a run; continue it with --resume {out} or choose a new folder")
            config = TrainConfig(**given)
            check_config(config)
            folder = out
        if report is not None and not report.parent.is_dir():
            raise TbdiagError(f"--report {report}: folder {report.parent} does not exist; create it first")
        history = _train_with_progress(train, config, folder, device, resume is not None, report)
        if history:
            last = history[-1]
            err_console.print(f"done: epoch {last['epoch']}, test accuracy {last['test_acc']:.4f}, run folder {folder}",
                              markup=False)


def _train_with_progress(train, config, folder: Path, device: str, resume: bool, report):  # noqa: ANN001, ANN202
    import logging

    from tbdiag.distributed import world

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
