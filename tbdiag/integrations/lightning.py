"""TempBalance inside a PyTorch Lightning ``Trainer``: a ``Callback`` (needs ``pip install lightning``).

    from tbdiag.integrations.lightning import TempBalanceCallback
    trainer = L.Trainer(callbacks=[TempBalanceCallback(per="update", every=100, warmup=500)])
    trainer.fit(module, loader)                       # or trainer.fit(module, loader, ckpt_path="last.ckpt")

**When.** At ``on_fit_start`` — after ``configure_optimizers`` ran and the strategy set the optimizer up,
before any step — the optimizer ``optimizer`` (an index, default 0; any grouping, e.g. over
`tbdiag.param_groups`) is split by unit, keeping every group's settings, and the schedulers of
``configure_optimizers`` built over it are adapted to the split. Only the layers whose weights this optimizer
holds are tuned and fitted: with several optimizers (manual optimisation, e.g. a GAN's generator and
discriminator) the others' layers are left alone; one callback per optimizer balances each.

**Counting.** ``per="update"``: after each batch, one ``step_update`` per step this optimizer really took
(counted by a step hook), so micro-batches of ``accumulate_grad_batches``, steps the AMP scaler skips and
other optimizers' steps do not count. ``per="epoch"``: ``step(current_epoch + 1)`` at each epoch's end. A
run resumed from a checkpoint without TempBalance's state counts on from the Trainer's step (one optimizer)
or from the optimizer state's ``step`` (several).

**Logged.** Before every batch, through ``pl_module.log_dict`` (so every Lightning logger gets them, at the
step ``LearningRateMonitor`` uses), the values for the coming update: ``log="summary"`` (default) the 8 keys
of `tbdiag.tempbalance.logs` (``tb/mult_min``, ``tb/mult_max``, ``tb/alpha_mean``, ``tb/alpha_std``,
``tb/rebalance_s``, ``tb/n_balances``, ``tb/n_units``, ``tb/n_failed``); ``log="groups"`` adds ``lr/<group>``,
the *effective* rate (base × multiplier), and ``alpha/<unit>``; ``log=None`` logs nothing. With several
optimizers the keys start with ``opt<index>/``. ``LearningRateMonitor`` reads ``group["lr"]`` between steps,
i.e. the *base* rate of the schedule, one entry per split group (``lr-AdamW/<group>``): the multiplier is
the ratio of the two.

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
from tbdiag.tempbalance.logs import LogMode, check_log_mode, log_values

logger = logging.getLogger(__name__)


class TempBalanceCallback(Callback):
    """Layer-wise learning rates from alpha for a Lightning ``Trainer``.

    Args:
        initial: multipliers to start from: a ``{unit: multiplier}`` dict or the path of a
            ``tbdiag recommend`` file (read now, so a bad file fails before training).
        module: attribute path of the submodule to balance (``"net"``, ``"model"``); default the whole
            LightningModule, whose layer names are those of its checkpoints (``net.blocks.0.mlp.0``).
        optimizer: index of the optimizer to balance among those ``configure_optimizers`` returns; the layers
            of the others are neither tuned nor fitted.
        log: ``summary`` (8 keys), ``groups`` (also ``lr/<group>`` and ``alpha/<unit>``) or None (no logging).
        **options: any `TempBalance` option, with its default: ``every`` (1), ``per`` (``"epoch"`` or
            ``"update"``), ``warmup`` (0), ``map``, ``min_ratio``, ``max_ratio``, ``metric``, ``unit``, ``fit``,
            ``include_first_last``, ``min_evals``, ``include``, ``exclude``, ``split_qkv``, ``device``,
            ``apply_scale``. (``schedulers`` and ``others`` are Lightning's.)

    Attributes:
        tempbalance: the `TempBalance` (None before ``fit``): ``multipliers``, ``effective_lrs()``, ``values``.

    Raises:
        TbdiagError: an unknown option, a bad ``log`` or ``optimizer``, or an unreadable ``initial`` file
            (here); bad option values, unit names of ``initial`` that are not this model's, no optimizer at
            that index, or any refusal of `TempBalance` (when ``fit`` starts).
    """

    def __init__(self, *, initial: Mapping[str, float] | str | Path | None = None, module: str | None = None,
                 optimizer: int = 0, log: LogMode | None = "summary", **options: Any) -> None:
        super().__init__()
        for name in ("schedulers", "others"):
            if name in options:
                raise TbdiagError(f"TempBalanceCallback: {name} come from configure_optimizers; do not pass them")
        if "log_rates" in options:
            raise TbdiagError("TempBalanceCallback: log_rates is now log: log='summary' (default), 'groups' or None")
        try:
            inspect.signature(TempBalance).bind(None, None, **options)
        except TypeError as e:
            raise TbdiagError(f"TempBalanceCallback: {e}; the options are TempBalance's") from None
        if log is not None:
            check_log_mode(log, "TempBalanceCallback")
        if isinstance(optimizer, bool) or not isinstance(optimizer, int) or optimizer < 0:
            raise TbdiagError(f"TempBalanceCallback: optimizer={optimizer!r}; give the index (0, 1, …) of an "
                              "optimizer that configure_optimizers returns")
        if isinstance(initial, (str, Path)):
            from tbdiag.allocation.recommend import load_multipliers

            initial = load_multipliers(initial)
        self.initial = dict(initial) if initial is not None else None
        self.module, self.optimizer_index, self.log_mode, self.options = module, optimizer, log, options
        self.tempbalance: TempBalance | None = None
        self._pending: dict[str, Any] | None = None  # state loaded before the balancer exists
        self._restored = False  # whether a state of ours was loaded (else a resumed run counts on from the Trainer)
        self._stepped = 0  # steps of this optimizer not yet passed to the balancer
        self._prefix = ""

    @property
    def state_key(self) -> str:
        """The class name (optimizer 0, as before), else with the optimizer's index: one state per callback."""
        return super().state_key if self.optimizer_index == 0 else self._generate_state_key(
            optimizer=self.optimizer_index)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizers, i = trainer.optimizers, self.optimizer_index
        if i >= len(optimizers):
            raise TbdiagError(f"TempBalanceCallback: optimizer={i}, but configure_optimizers returned "
                              f"{len(optimizers)} optimizer(s); give an index below {len(optimizers)}"
                              if optimizers else "TempBalanceCallback: configure_optimizers returned no optimizer")
        optimizer = optimizers[i]
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs
                      if getattr(c.scheduler, "optimizer", optimizer) is optimizer]
        model = pl_module if self.module is None else pl_module.get_submodule(self.module)
        resuming = self._pending is not None
        others = [o for j, o in enumerate(optimizers) if j != i]
        self.tempbalance = TempBalance(model, optimizer, schedulers=schedulers, others=others,
                                       initial={} if resuming else self.initial, **self.options)
        self._prefix, self._stepped, self._restored = f"opt{i}/" if len(optimizers) > 1 else "", 0, resuming
        self.tempbalance.optimizer.register_step_post_hook(self._count)
        if resuming:  # no balance now: the checkpoint's multipliers apply
            self.tempbalance.load_state_dict(self._pending)
            self._pending = None

    def _count(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._stepped += 1

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        tb = self.tempbalance
        if tb is None or self._restored or not trainer.global_step:
            return
        tb.updates, tb.epoch = self._updates_so_far(trainer), trainer.current_epoch  # a checkpoint without our state
        logger.info("TempBalance: resumed without its state; counting on from update %d", tb.updates)

    def _updates_so_far(self, trainer: Trainer) -> int:
        """This optimizer's steps before the resume: the Trainer's step with one optimizer; with several, the
        ``step`` its state keeps (Adam and most others), else 0 with a warning."""
        if len(trainer.optimizers) == 1:
            return int(trainer.global_step)
        steps = [int(s["step"]) for s in self.tempbalance.optimizer.state.values() if "step" in s]
        if not steps:
            logger.warning("TempBalance: resumed without its state and several optimizers; this optimizer keeps "
                           "no step count, so its updates are counted from 0")
        return max(steps, default=0)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.log_mode is not None and self.tempbalance is not None:
            values = log_values(self.tempbalance, self.log_mode)
            pl_module.log_dict({self._prefix + k: v for k, v in values.items()}, on_step=True, on_epoch=False,
                               logger=bool(trainer.loggers), batch_size=1)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        tb, stepped, self._stepped = self.tempbalance, self._stepped, 0
        for _ in range(stepped if tb is not None else 0):  # one by one: none of the due rebalances is skipped
            tb.step_update()

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
            self._restored = True
