"""What a training run is and what it records: ``TrainConfig``, everything that decides a run's numbers, with
the names each choice may take (`CHOICES`: the CLI lists them, the trainer implements them) and the range of
every number, checked on creation (written to a run folder's ``config.json`` by `tbdiag.runs.folder`); and the
per-epoch record of ``metrics.jsonl`` as readers get it (`epoch_record`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from tbdiag.errors import TbdiagError

# The names each choice of a TrainConfig may take (the CLI lists them; the trainer implements them).
CHOICES: dict[str, tuple[str, ...]] = {
    "model": ("resnet18", "resnet34", "vgg16", "vgg19", "cnn", "mlp"),
    "method": ("tb", "cal", "snr", "tb+snr", "sgdr"),
    "data": ("cifar10", "cifar100", "mnist", "svhn", "folder", "npz", "synthetic"),
    "tb_map": ("linear", "sqrt", "log2", "step", "sigmoid"),
    "tb_fit": ("median", "ks", "peak"),
    "tb_metric": ("alpha", "alpha_weighted", "spectral_norm"),
}
_NOUN = {"model": "model", "method": "method", "data": "data set", "tb_map": "map", "tb_fit": "estimator",
         "tb_metric": "metric"}


class ConfigError(TbdiagError):
    """A `TrainConfig` value out of range: ``field`` names it so that a front end can name its own option."""

    def __init__(self, field: str, value: object, problem: str) -> None:
        super().__init__(f"{field} {value}: {problem}")
        self.field, self.value, self.problem = field, value, problem


def _whole(lo: int, hi: float = math.inf) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi


def _real(ok: Callable[[float], bool]) -> Callable[[Any], bool]:
    return lambda v: _number(v) and math.isfinite(v) and ok(v)


FLOAT32_MAX = 3.4028234663852886e38  # a rate beyond it overflows the float32 optimizer arithmetic at once
# (field, test, what the value must be); None is allowed where the field's default is None.
_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("epochs", _whole(1), "a whole number ≥ 1"),
    ("batch_size", _whole(1), "a whole number ≥ 1"),
    ("seed", _whole(0, 2**32), "a whole number from 0 to 2³² − 1"),
    ("synthetic_size", _whole(1), "a whole number ≥ 1"),
    ("train_subset", _whole(0), "a whole number ≥ 0 (0: every training image)"),
    ("tb_every", _whole(0), "a whole number ≥ 0 (0: never rebalance)"),
    ("sgdr_period", _whole(1), "a whole number of epochs ≥ 1"),
    ("sgdr_mult", _whole(1), "a whole number ≥ 1"),
    ("lr", _real(lambda v: 0 < v <= FLOAT32_MAX), "a number > 0 that float32 weights can hold"),
    ("momentum", _real(lambda v: 0 <= v < 1), "a number in [0, 1)"),
    ("weight_decay", _real(lambda v: 0 <= v <= FLOAT32_MAX), "a number ≥ 0 that float32 weights can hold"),
    ("width", _real(lambda v: v > 0), "a finite number > 0"),
    ("tb_min_ratio", _real(lambda v: v > 0), "a finite number > 0"),
    ("tb_max_ratio", _real(lambda v: v > 0), "a finite number > 0"),
    ("snr_strength", _real(lambda v: v >= 0), "a finite number ≥ 0"),
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run's numbers (written to ``config.json``); checked on creation.

    Raises:
        ConfigError: a name that is not one of `CHOICES`, or a number out of its range.
    """

    model: str = "resnet18"
    data: str = "cifar10"
    data_dir: str | None = None
    method: str = "tb"
    epochs: int = 200
    lr: float | None = None  # None: the paper's default for the model (0.1 ResNet, 0.05 VGG and others)
    batch_size: int = 128
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 0
    width: float = 1.0
    tb_map: str = "linear"
    tb_min_ratio: float | None = None  # None: 0.5 (tb) or 0.6 (tb+snr)
    tb_max_ratio: float | None = None  # None: 1.5 (tb) or 1.4 (tb+snr)
    tb_every: int = 1
    tb_fit: str = "median"
    tb_metric: str = "alpha"
    snr_strength: float = 0.01
    sgdr_period: int = 10
    sgdr_mult: int = 2
    synthetic_size: int = 512
    train_subset: int = 0  # a seeded, class-stratified sample of this many training images (0: all)
    init_from: str | None = None
    multipliers: str | None = None

    def __post_init__(self) -> None:
        for field, choices in CHOICES.items():
            value = getattr(self, field)
            if value not in choices:
                raise ConfigError(field, value, f"unknown {_NOUN[field]}; use one of {', '.join(choices)}")
        for field, ok, rule in _RULES:
            value = getattr(self, field)
            if value is not None and not ok(value):
                raise ConfigError(field, value, f"out of range; use {rule}")
        lo, hi = self.ratios()
        if lo > hi:
            field = "tb_min_ratio" if self.tb_min_ratio is not None else "tb_max_ratio"
            raise ConfigError(field, getattr(self, field), f"the smallest multiplier {lo} exceeds the largest {hi}; "
                                                           "use min ≤ max")

    def resolved_lr(self) -> float:
        """The initial learning rate."""
        return self.lr if self.lr is not None else (0.1 if self.model.startswith("resnet") else 0.05)

    def ratios(self) -> tuple[float, float]:
        """TempBalance's multiplier range."""
        lo, hi = (0.6, 1.4) if self.method == "tb+snr" else (0.5, 1.5)
        return (self.tb_min_ratio if self.tb_min_ratio is not None else lo,
                self.tb_max_ratio if self.tb_max_ratio is not None else hi)


# The numbers of an epoch record (metrics.jsonl) that readers use, besides "epoch" and "layers".
EPOCH_NUMBERS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")


def _number(value: Any) -> bool:
    """A JSON number a float can hold (an integer like 10**400 cannot: it is no number a run writes)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def epoch_record(raw: Any) -> tuple[dict, list[str]]:
    """An epoch record of ``metrics.jsonl`` with every field readers use, and the fields it had to fill in.

    ``epoch`` must be a whole number ≥ 1. Each of `EPOCH_NUMBERS` that is missing or not a number becomes
    ``nan``; ``layers`` maps layer names to ``{"alpha": …, "lr": …}``, where a missing or non-numeric value is
    ``None`` (as the trainer writes a layer without an alpha) and a missing ``layers`` is ``{}``. Other keys
    are kept as they are.

    Raises:
        ValueError: not a JSON object with a whole epoch ≥ 1.
    """
    if not isinstance(raw, dict) or not _whole(1, 2 ** 53)(raw.get("epoch")):
        raise ValueError("not an epoch record (an object with a whole epoch ≥ 1)")
    record, filled = dict(raw), []
    for key in EPOCH_NUMBERS:
        if not _number(raw.get(key)):
            record[key] = math.nan
            filled.append(key)
    layers = raw.get("layers", {})
    bad = not isinstance(layers, dict)  # a layer's entry or value that is not what the trainer writes
    record["layers"] = {}
    for name, entry in (layers.items() if isinstance(layers, dict) else ()):
        if not isinstance(entry, dict):
            entry, bad = {}, True
        values = {k: entry.get(k) if _number(entry.get(k)) else None for k in ("alpha", "lr")}
        bad = bad or any(values[k] is None and entry.get(k) is not None for k in values)
        record["layers"][str(name)] = {**entry, **values}
    if bad:
        filled.append("a layer's alpha or lr")
    return record, filled
