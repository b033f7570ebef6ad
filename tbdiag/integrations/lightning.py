"""TempBalance inside a PyTorch Lightning ``Trainer``: a ``Callback`` (needs ``pip install lightning``).

    from tbdiag.integrations.lightning import TempBalanceCallback
    trainer = L.Trainer(callbacks=[TempBalanceCallback(per="update", every=100, warmup=500)])
    trainer.fit(module, loader)                       # or trainer.fit(module, loader, ckpt_path="last.ckpt")

**When.** At ``on_fit_start`` — after ``configure_optimizers`` ran and the strategy set the optimizer up,
before any step — the first optimizer of the Trainer (any grouping, e.g. over `tbdiag.param_groups`) is
split by unit, keeping every group's settings, and the schedulers of ``configure_optimizers`` (built over
the original groups) are adapted to the split.

**Counting.** ``per="update"``: ``step_update(trainer.global_step)`` after a batch whose optimizer step
ran — Lightning increments ``global_step`` only on real optimizer steps, so with ``accumulate_grad_batches``
updates are counted, not micro-batches. ``per="epoch"``: ``step(current_epoch + 1)`` at each epoch's end.

**Rates logged.** Before every batch, through ``pl_module.log_dict`` (so every Lightning logger gets them,
at the step ``LearningRateMonitor`` uses): ``lr/<group>``, the *effective* rate the coming update steps
with (base × multiplier), ``alpha/<unit>`` and ``tb/balance_s`` (`TempBalance.log_values`).
``LearningRateMonitor`` reads ``group["lr"]`` between steps, i.e. the *base* rate of the schedule, one
entry per split group (``lr-AdamW/<group>``): the multiplier is the ratio of the two.

**Resuming.** The callback's ``state_dict`` (counters, multipliers, last alphas) goes into Lightning's
checkpoints; the optimizer and its schedulers are saved in their original group layout, so a checkpoint
of a run without TempBalance resumes with it and vice versa. Lightning restores callback state before
``on_fit_start`` (kept until the balancer exists) or, with strategies that restore after setup, after
it; optimizer and scheduler states are loaded after the split and converted. ``trainer.fit(..., ckpt_path=...)``
continues as if uninterrupted (bit for bit on CPU, tested), as long as the checkpoint was written at an
epoch's end or the dataloader resumes mid-epoch.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # the older distribution
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer
    except ImportError as e:
        raise ImportError("tbdiag.integrations.lightning needs PyTorch Lightning: pip install lightning") from e

from tbdiag.errors import TbdiagError
from tbdiag.tempbalance.balancer import TempBalance

logger = logging.getLogger(__name__)


class TempBalanceCallback(Callback):
    """Layer-wise learning rates from alpha for a Lightning ``Trainer``.

    Args:
        initial: multipliers to start from: a ``{unit: multiplier}`` dict or the path of a
            ``tbdiag recommend`` file (read now, so a bad file fails before training).
        module: attribute path of the submodule to balance (``"net"``, ``"model"``); default the whole
            LightningModule, whose layer names are those of its checkpoints (``net.blocks.0.mlp.0``).
        log_rates: log `TempBalance.log_values` before every batch.
        **options: any `TempBalance` option, with its default: ``every`` (1), ``per`` (``"epoch"`` or
            ``"update"``), ``warmup`` (0), ``map``, ``min_ratio``, ``max_ratio``, ``metric``, ``unit``, ``fit``,
            ``exclude_first_last``, ``min_evals``, ``include``, ``exclude``, ``split_qkv``, ``device``,
            ``apply_scale``. (``schedulers`` are Lightning's.)

    Attributes:
        tempbalance: the `TempBalance` (None before ``fit``): ``multipliers``, ``effective_lrs()``, ``values``.

    Raises:
        TbdiagError: an unknown option, or an unreadable ``initial`` file (here); bad option values, unit
            names of ``initial`` that are not this model's, or no optimizer (when ``fit`` starts).
    """

    def __init__(self, *, initial: Mapping[str, float] | str | Path | None = None, module: str | None = None,
                 log_rates: bool = True, **options: Any) -> None:
        super().__init__()
        if "schedulers" in options:
            raise TbdiagError("TempBalanceCallback: schedulers come from configure_optimizers; do not pass them")
        try:
            inspect.signature(TempBalance).bind(None, None, **options)
        except TypeError as e:
            raise TbdiagError(f"TempBalanceCallback: {e}; the options are TempBalance's") from None
        if isinstance(initial, (str, Path)):
            from tbdiag.tempbalance.recommend import load_multipliers

            initial = load_multipliers(initial)
        self.initial = dict(initial) if initial is not None else None
        self.module, self.log_rates, self.options = module, log_rates, options
        self.tempbalance: TempBalance | None = None
        self._pending: dict[str, Any] | None = None  # state loaded before the balancer exists

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.optimizers:
            raise TbdiagError("TempBalanceCallback: configure_optimizers returned no optimizer")
        if len(trainer.optimizers) > 1:
            logger.warning("TempBalanceCallback: %d optimizers; only the first is balanced", len(trainer.optimizers))
        optimizer = trainer.optimizers[0]
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs
                      if getattr(c.scheduler, "optimizer", optimizer) is optimizer]
        model = pl_module if self.module is None else pl_module.get_submodule(self.module)
        resuming = self._pending is not None
        self.tempbalance = TempBalance(model, optimizer, schedulers=schedulers,
                                       initial={} if resuming else self.initial, **self.options)
        if resuming:  # no balance now: the checkpoint's multipliers apply
            self.tempbalance.load_state_dict(self._pending)
            self._pending = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.log_rates and self.tempbalance is not None:
            pl_module.log_dict(self.tempbalance.log_values(), on_step=True, on_epoch=False,
                               logger=bool(trainer.loggers), batch_size=1)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        tb = self.tempbalance
        if tb is not None and trainer.global_step > tb.updates:  # an optimizer step ran (not a micro-batch)
            tb.step_update(trainer.global_step)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.tempbalance is not None:
            self.tempbalance.step(trainer.current_epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        if self.tempbalance is None:
            return dict(self._pending or {})
        return self.tempbalance.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.tempbalance is None:
            self._pending = dict(state_dict)
        else:
            self.tempbalance.load_state_dict(state_dict)
