"""TempBalance in PyTorch Lightning: a small character-level transformer with AdamW and warm-up + cosine.

    python examples/lightning_tempbalance.py [--data ../shared/data/tinyshakespeare/input.txt] [--steps 200]
    python examples/lightning_tempbalance.py --accumulate 2 --logdir lightning_logs   # + CSV log, LearningRateMonitor

Trains on tiny Shakespeare when the file is there, otherwise on seeded synthetic text, on the CPU (about
30 s of CPU time). `TempBalanceCallback` splits the optimizer built in ``configure_optimizers`` by layer,
adapts its scheduler, and rebalances every ``--every`` updates after ``--warmup``. Prints the validation loss
before and after, and every param group's alpha, multiplier, base and effective learning rate. With
``--logdir``, ``metrics.csv`` holds ``lr/<group>`` (effective, from the callback) beside
``lr-AdamW/<group>`` (the base rate, from ``LearningRateMonitor``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import lightning.pytorch as L
import torch
from torch import nn

import tbdiag
from tbdiag.integrations.lightning import TempBalanceCallback

WORDS = ("the king queen lord lady doth speak of love and war my good sir thou art most noble fair night "
         "day sweet death life heart crown sword come go hence").split()


def load_text(path: str, seed: int) -> str:
    """The file if it exists, else ~200k characters of seeded word salad with some structure."""
    if Path(path).is_file():
        return Path(path).read_text(encoding="utf-8")
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(6000):
        n = int(torch.randint(3, 9, (1,), generator=g))
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)]
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines)


class Windows(torch.utils.data.Dataset):
    """``n`` seeded random windows of ``block + 1`` characters."""

    def __init__(self, data: torch.Tensor, block: int, n: int, seed: int) -> None:
        self.data, self.block = data, block
        self.starts = torch.randint(0, len(data) - block - 1, (n,), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        s = int(self.starts[i])
        return self.data[s:s + self.block + 1]


class CharGPT(L.LightningModule):
    def __init__(self, vocab: int, block: int, lr: float, max_steps: int, warmup_steps: int, d: int = 64,
                 n_blocks: int = 3) -> None:
        super().__init__()
        self.lr, self.max_steps, self.warmup_steps = lr, max_steps, warmup_steps
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Parameter(torch.zeros(block, d))
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True,
                                                               norm_first=True) for _ in range(n_blocks))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(block), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb[:t]
        for block in self.blocks:
            x = block(x, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.ln_f(x))

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self(batch[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, logger=self.trainer.logger is not None)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(tbdiag.param_groups(self, weight_decay=0.1), lr=self.lr, betas=(0.9, 0.95))

        def schedule(step: int) -> float:  # linear warm-up, then cosine to 10 %
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            done = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, done)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/tinyshakespeare/input.txt",
                        help="a text file (synthetic text when it does not exist)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer updates")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block", type=int, default=64, help="context length")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per update")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--every", type=int, default=40, help="rebalance every this many updates")
    parser.add_argument("--warmup", type=int, default=80, help="no rebalance (multipliers 1) before this update")
    parser.add_argument("--logdir", default=None, help="write a CSV log with LearningRateMonitor here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (one is fastest for this tiny model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    text = load_text(args.data, args.seed)
    source = args.data if Path(args.data).is_file() else "synthetic text"
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train = Windows(data[:split], args.block, args.steps * args.batch_size * args.accumulate, args.seed)
    val = torch.stack(list(Windows(data[split:], args.block, 64, args.seed + 1)))

    torch.manual_seed(args.seed)
    model = CharGPT(len(chars), args.block, args.lr, args.steps, max(1, args.steps // 10))
    tb_callback = TempBalanceCallback(per="update", every=args.every, warmup=args.warmup)
    callbacks: list[L.Callback] = [tb_callback]
    logger = False
    if args.logdir:
        logger = L.loggers.CSVLogger(args.logdir, name="tempbalance")
        callbacks.append(L.callbacks.LearningRateMonitor(logging_interval="step"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, accumulate_grad_batches=args.accumulate,
                        logger=logger, callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=10)
    with torch.no_grad():
        before = model.loss(val).item()
    trainer.fit(model, torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=False))
    model.eval()
    with torch.no_grad():
        after = model.loss(val).item()

    tb = tb_callback.tempbalance
    print(f"{source}: {len(text):,} characters, vocabulary {len(chars)}; {trainer.global_step} updates, "
          f"{tb.n_balances} rebalances ({tb.total_balance_s:.2f} s)")
    print(f"validation loss {before:.3f} -> {after:.3f}")
    print(f"{'param group':42} {'alpha':>6} {'multiplier':>10} {'base lr':>9} {'effective lr':>12}")
    effective = tb.effective_lrs()
    for g in tb.optimizer.param_groups:
        alpha = tb.values.get(g["unit"], math.nan)
        print(f"{g['name']:42} {alpha:6.2f} {tb.multipliers[g['unit']]:10.3f} {g['lr']:9.2e} "
              f"{effective[g['name']]:12.2e}")
    if args.logdir:
        print(f"log: {Path(trainer.logger.log_dir) / 'metrics.csv'}")


if __name__ == "__main__":
    main()
