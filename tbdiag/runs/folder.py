"""The training run folder: its config, metrics and resumable checkpoints, read and written here only.

    DIR/config.json                          the `TrainConfig`
    DIR/metrics.jsonl                        one line per completed epoch (rewritten from the checkpoint's history)
    DIR/checkpoints/epoch-0005.safetensors   weights after epoch 5
    DIR/checkpoints/epoch-0005.state.pt      optimizer, scheduler, TempBalance, SNR, RNG state and history
    DIR/checkpoints/last.json                names the newest complete pair; written last, atomically
    DIR/checkpoints/best.safetensors         weights of the best test accuracy so far (and best.json)

Every file is written atomically (temporary file, fsync, rename), a new pair before ``last.json`` moves to
it, and the two newest pairs are kept. Readers trust nothing: `load_last` resumes from the newest pair
that loads completely (a truncated file or a corrupt ``last.json`` costs at most an epoch, with a warning
naming what was skipped), and `read_metrics` skips a half-written last line and shows a value a record
lacks as missing, each with a warning. Training code
(`tbdiag.train`) and reports (`tbdiag.report`) both use this module; it imports neither, and torch only
where it reads or writes checkpoints. The config itself, `TrainConfig` with its choices and ranges, is in
`tbdiag.runs.config`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tbdiag.errors import TbdiagError
from tbdiag.runs.config import TrainConfig, epoch_record

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

KEPT_PAIRS = 2  # checkpoint pairs kept on disk: the newest and one to fall back to

def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a training run folder: a ``config.json`` beside ``checkpoints/`` (a Hugging Face
    model folder has a config.json too, but no checkpoints folder)."""
    return path.is_dir() and (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def read_config(folder: Path) -> TrainConfig:
    """The config of an existing run folder.

    Raises:
        TbdiagError: no run there, or a config this version cannot read.
    """
    path = folder / "config.json"
    if not path.is_file():
        raise TbdiagError(f"{folder}: not a training run (no config.json); pass the folder a training run wrote")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return TrainConfig(**raw)
    except (ValueError, TypeError, TbdiagError) as exc:
        raise TbdiagError(f"{path}: unreadable run config ({exc}); start a new run in another folder") from None


def write_config(folder: Path, config: TrainConfig) -> None:
    """Create the run folder and write its config."""
    from tbdiag.io.outputs import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "checkpoints").mkdir(exist_ok=True)
    atomic_write(folder / "config.json", json.dumps(dataclasses.asdict(config), indent=1) + "\n")


@dataclasses.dataclass(frozen=True)
class SavedEpoch:
    """A checkpoint pair as loaded: the weights and the training state after ``epoch`` epochs."""

    epoch: int
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]  # optimizer, scheduler, tempbalance, snr, rng, history (JSON text)
    pointer_ok: bool  # whether last.json names this pair (False: rewrite it with `write_pointer`)


class _Unreadable(Exception):
    """A checkpoint file that is missing, truncated or not what it should be (the message names it)."""


_PAIR = re.compile(r"epoch-(\d+)\.(safetensors|state\.pt)")
_READ_ERRORS = (OSError, RuntimeError, EOFError, ValueError, KeyError, TypeError, pickle.UnpicklingError)


def _stem(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def _short(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [""])[0].strip()
    return f"{type(exc).__name__}: {text[:100]}" if text else type(exc).__name__


def write_pointer(folder: Path, epoch: int) -> None:
    """Point ``checkpoints/last.json`` at the pair of ``epoch``."""
    from tbdiag.io.outputs import atomic_write

    stem = _stem(epoch)
    atomic_write(folder / "checkpoints" / "last.json", json.dumps({"epoch": epoch, "weights": f"{stem}.safetensors",
                                                                   "state": f"{stem}.state.pt"}) + "\n")


def save_checkpoint(folder: Path, epoch: int, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write the epoch's weights and state, move ``last.json`` to them, then drop all but the newest pairs."""
    import torch
    from safetensors.torch import save_file

    from tbdiag.io.checkpoint import order_metadata
    from tbdiag.io.outputs import atomic_save

    ck = folder / "checkpoints"
    stem = _stem(epoch)
    atomic_save(ck / f"{stem}.safetensors", lambda p: save_file(weights, p, metadata=order_metadata(list(weights))))
    atomic_save(ck / f"{stem}.state.pt", lambda p: torch.save(state, p))
    write_pointer(folder, epoch)
    older = [e for e in _epochs_on_disk(ck) if e < epoch]
    for old in older[KEPT_PAIRS - 1:]:
        for suffix in (".safetensors", ".state.pt"):
            (ck / f"{_stem(old)}{suffix}").unlink(missing_ok=True)
    for tmp in ck.glob(".epoch-*.tmp"):  # left by a write that was killed
        tmp.unlink(missing_ok=True)


def save_best(folder: Path, weights: dict[str, torch.Tensor], record: dict) -> None:
    """Keep the weights of the best epoch so far."""
    from safetensors.torch import save_file

    from tbdiag.io.checkpoint import order_metadata
    from tbdiag.io.outputs import atomic_save, atomic_write

    ck = folder / "checkpoints"
    meta = {"epoch": str(record["epoch"]), **order_metadata(list(weights))}
    atomic_save(ck / "best.safetensors", lambda p: save_file(weights, p, metadata=meta))
    atomic_write(ck / "best.json", json.dumps(record) + "\n")


def _epochs_on_disk(ck: Path) -> list[int]:
    """Epochs with at least one file of a pair in ``ck``, newest first."""
    found = {int(m.group(1)) for p in ck.glob("epoch-*") if (m := _PAIR.fullmatch(p.name))}
    return sorted(found, reverse=True)


def _pointed_epoch(ck: Path) -> tuple[int | None, str | None]:
    """(epoch last.json names, None) or (None, why it cannot be used); (None, None) when there is none."""
    pointer = ck / "last.json"
    if not pointer.exists():
        return None, None
    try:
        doc = json.loads(pointer.read_text(encoding="utf-8"))
        epoch = doc["epoch"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise ValueError(f"epoch {epoch!r}")
        return epoch, None
    except _READ_ERRORS as exc:
        return None, f"last.json ({_short(exc)})"


_STATE_KEYS = ("optimizer", "scheduler", "rng", "tempbalance", "snr", "history")


def _load_pair(ck: Path, epoch: int) -> tuple[dict, dict]:
    """(weights, state) of an epoch's pair.

    Raises:
        _Unreadable: a file of the pair is missing, truncated or incomplete.
    """
    import torch

    weights = _read_weights(ck, epoch, load=True)
    name = f"{_stem(epoch)}.state.pt"
    try:
        state = torch.load(ck / name, weights_only=True)
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise KeyError(f"lacks {', '.join(missing)}")
        history = json.loads(state["history"])
    except _READ_ERRORS as exc:
        raise _Unreadable(f"{name} ({_short(exc)})") from None
    if not isinstance(history, list) or len(history) != epoch:
        raise _Unreadable(f"{name} (its history does not hold {epoch} epochs)")
    return weights, state


def _read_weights(ck: Path, epoch: int, load: bool) -> Any:
    """The weights of an epoch (``load``), or just their path once the file is checked to be complete.

    Raises:
        _Unreadable: the file is missing or its header and data do not cover it exactly.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = ck / f"{_stem(epoch)}.safetensors"
    try:
        if load:
            return load_file(path)
        with safe_open(path, "pt"):  # validates the header against the file's size
            return path
    except (*_READ_ERRORS, SafetensorError) as exc:
        raise _Unreadable(f"{path.name} ({_short(exc)})") from None


def _newest(folder: Path, read: Callable[[Path, int], Any]) -> tuple[tuple[int, Any] | None, bool, list[str]]:
    """((epoch, what ``read`` returned) for the newest pair it accepts, or None; whether ``last.json``
    names that pair; what was skipped). Pairs are tried newest first, whatever ``last.json`` says: it may
    be corrupt, or lag a pair written just before a kill."""
    ck = folder / "checkpoints"
    pointed, problem = _pointed_epoch(ck)
    skipped = [problem] if problem else []
    for epoch in sorted(set(_epochs_on_disk(ck)) | ({pointed} if pointed else set()), reverse=True):
        try:
            return (epoch, read(ck, epoch)), pointed == epoch, skipped
        except _Unreadable as exc:
            skipped.append(str(exc))
    return None, False, skipped


def load_last(folder: Path) -> SavedEpoch | None:
    """The newest checkpoint pair that loads completely, or None when no epoch has been saved.

    Each file that cannot be read (and a corrupt ``last.json``) is named in one warning.

    Raises:
        TbdiagError: checkpoint files exist but none forms a readable pair.
    """
    found, pointer_ok, skipped = _newest(folder, _load_pair)
    if found is None:
        if skipped:
            raise TbdiagError(f"{folder / 'checkpoints'}: no readable checkpoint pair ({'; '.join(skipped)}); move "
                              "that folder away to restart the run from its first epoch, or start a new run")
        return None
    epoch, (weights, state) = found
    if skipped:
        log.warning("%s: resuming after epoch %d; skipped unreadable %s", folder, epoch, "; ".join(skipped))
    return SavedEpoch(epoch, weights, state, pointer_ok)


def last_weights(folder: Path) -> Path | None:
    """The weights file of the newest complete pair (for reports), or None when there is none."""
    found, _, skipped = _newest(folder, lambda ck, epoch: _read_weights(ck, epoch, load=False))
    if skipped:
        log.warning("%s: %s; skipped unreadable %s", folder,
                    f"using the weights of epoch {found[0]}" if found else "no readable weights", "; ".join(skipped))
    return found[1] if found is not None else None


def read_metrics(folder: Path) -> list[dict]:
    """The per-epoch records of ``metrics.jsonl`` ([] when there is none), each with every field readers use
    (`tbdiag.runs.config.epoch_record`): a value the file lacks, or holds as something other than a number, is
    shown as missing (``nan``; ``None`` in ``layers``), never guessed, and named in one warning per field.

    A last line cut short (a copy or a writer that was not atomic stopped mid-line) is skipped with a
    warning; a broken line before it is an error.

    Raises:
        TbdiagError: a line other than the last is not an epoch record.
    """
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    records, filled = [], {}
    for i, line in enumerate(lines):
        try:
            record, missing = epoch_record(json.loads(line))
        except (ValueError, RecursionError) as exc:
            if i == len(lines) - 1:
                log.warning("%s: skipped its last line, which is incomplete (%s)", path, _short(exc))
                break
            raise TbdiagError(f"{path}: line {i + 1} is not an epoch record ({_short(exc)}); fix or remove that "
                              "line (training rewrites the file at its next epoch)") from None
        records.append(record)
        for key in missing:
            filled.setdefault(key, []).append(str(record["epoch"]))
    for key, epochs in filled.items():
        more = f", … (+{len(epochs) - 5})" if len(epochs) > 5 else ""
        log.warning("%s: %s missing or not a number in epoch %s%s; shown as missing", path, key, ", ".join(epochs[:5]),
                    more)
    return records


def write_metrics(folder: Path, history: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` from the history of completed epochs."""
    from tbdiag.io.outputs import atomic_write

    atomic_write(folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
