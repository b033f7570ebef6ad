"""TempBalance inside a Hugging Face ``Trainer``: a ``TrainerCallback`` (needs ``pip install tbdiag[hf]``).

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[TempBalanceCallback(every=100, warmup=200)])

At ``on_train_begin`` the Trainer's optimizer (its own AdamW with decay/no-decay groups, or one built
through ``optimizer_cls_and_kwargs``, e.g. over `tbdiag.param_groups`) is looked through accelerate's
wrapper and split by unit, and its LambdaLR — built before any callback runs — is adapted. Updates are
counted by a post-hook on the optimizer's step, so gradient accumulation counts one update per step and an
fp16 step the GradScaler skips counts none. Each rebalance refits every tuned layer. Each log row gets a
compact summary (``log="summary"``, 8 keys whatever the model: ``tb/mult_min``, ``tb/mult_max``,
``tb/alpha_mean``, ``tb/alpha_std``, ``tb/rebalance_s``, ``tb/n_balances``, ``tb/n_units``, ``tb/n_failed``;
`tbdiag.tempbalance.logs`) or, with ``log="groups"``, also the effective rate of every group (``lr/<group>``)
and the mean alpha of every unit (``alpha/<unit>``). Rates and multipliers in a row are those the optimizer
step of that row (``state.global_step``) used, recorded by the step hook. The state is written beside
every checkpoint (``tbdiag_tempbalance.json``) and read back when the Trainer resumes from it, so the
multipliers continue unchanged (the optimizer and scheduler checkpoints stay in the Trainer's original group
layout).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tbdiag.errors import TbdiagError
from tbdiag.tempbalance.balancer import TempBalance
from tbdiag.tempbalance.logs import LogMode, StepRates, check_log_mode, log_values, step_rates
from tbdiag.tempbalance.optim import inner_optimizer

log = logging.getLogger(__name__)

STATE_FILE = "tbdiag_tempbalance.json"


class TempBalanceCallback(TrainerCallback):
    """Layer-wise learning rates from alpha for a ``transformers.Trainer``.

    Args:
        every: rebalance every ``every`` optimizer updates (``per="update"``) or epochs (``per="epoch"``).
        per: ``update`` (default) or ``epoch``.
        warmup: no rebalance before this many updates/epochs (multipliers 1 until then).
        initial: multipliers to start from: a ``{unit: multiplier}`` dict or a ``tbdiag recommend`` file.
        log: what each log row gets: ``summary`` (default, 8 keys) or ``groups`` (the summary, ``lr/<group>``
            for every param group and ``alpha/<unit>`` for every unit: hundreds of keys for a large model).
        **options: any other `TempBalance` option (``map``, ``min_ratio``, ``max_ratio``, ``metric``,
            ``unit``, ``fit``, ``include``, ``exclude``, ``split_qkv`` …).
    """

    def __init__(self, *, every: int = 100, per: str = "update", warmup: int = 0,
                 initial: Mapping[str, float] | str | Path | None = None, log: LogMode = "summary",
                 **options: Any) -> None:
        check_log_mode(log, "TempBalanceCallback")
        self.every, self.per, self.warmup, self.log_mode, self.options = every, per, warmup, log, options
        if isinstance(initial, (str, Path)):
            from tbdiag.allocation.recommend import load_multipliers

            initial = load_multipliers(initial)
        self.initial = dict(initial) if initial is not None else None
        self.tb: TempBalance | None = None
        self.updates = 0  # optimizer steps that really ran
        self._counted = 0  # updates already passed to the balancer
        self._used: StepRates | None = None  # what the last optimizer step used

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       lr_scheduler: Any = None, **kwargs: Any) -> None:
        if optimizer is None or model is None:
            raise TbdiagError("TempBalanceCallback: the Trainer passed no model or optimizer to on_train_begin")
        inner = inner_optimizer(optimizer)
        if self.tb is not None and self.tb.optimizer is inner:
            return  # a second train() call on the same Trainer
        saved = self._saved_state(args, state)
        self.tb = TempBalance(model, inner, every=self.every, per=self.per, warmup=self.warmup,
                              initial={} if saved else self.initial,
                              schedulers=[lr_scheduler] if lr_scheduler is not None else (), **self.options)
        if saved:
            self.tb.load_state_dict(saved)
            log.info("TempBalance: resumed at update %d with %d units", self.tb.updates, len(self.tb.units))
        elif state.global_step:  # resumed from a checkpoint outside output_dir: counters from the Trainer,
            self.tb.updates, self.tb.epoch = int(state.global_step), int(state.epoch or 0)
            if self.tb.every and self.tb.updates >= self.tb.warmup and self.initial is None and not self.tb.n_balances:
                self.tb.balance()  # multipliers from the weights now (fitted already when there is no warm-up)
        self.updates = self._counted = self.tb.updates
        inner.register_step_post_hook(self._count)

    def _count(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.updates += 1
        if self.tb is not None:  # after TempBalance's own post-hook: the scheduler's lr, the step's multipliers
            self._used = step_rates(self.tb)

    @staticmethod
    def _saved_state(args: Any, state: Any) -> dict | None:
        if not state.global_step:
            return None
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
        if not path.is_file():
            log.warning("TempBalance: resuming at step %d without %s (a checkpoint outside output_dir?); counting on "
                        "from the Trainer's step and rebalancing from the weights now", state.global_step, path)
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tb is not None and self.updates > self._counted:  # a skipped (fp16 overflow) step counts nothing
            self._counted = self.updates
            self.tb.step_update(self.updates)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tb is not None:
            self.tb.step(int(math.floor(state.epoch + 1e-9)))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.tb is None or logs is None:
            return
        values = log_values(self.tb, self.log_mode, self._used)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tb is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            from tbdiag.io.outputs import atomic_write

            atomic_write(folder / STATE_FILE, json.dumps(self.tb.state_dict(), indent=1) + "\n")
