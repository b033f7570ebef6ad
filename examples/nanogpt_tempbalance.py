"""A nanoGPT-style character-level transformer, trained with AdamW + warm-up/cosine under TempBalance.

    python examples/nanogpt_tempbalance.py [--data ../shared/data/tinyshakespeare/input.txt] [--steps 200]
    python examples/nanogpt_tempbalance.py --unit block --min-ratio 1 --max-ratio 5   # per block, up-only
    python examples/nanogpt_tempbalance.py --no-tempbalance          # the same run without TempBalance

Reads the text file when it exists (the first 90 % trains, the last 10 % validates), else a few built-in
sonnets, so it runs anywhere. The model, the schedule `lr_at` and the loop read top to bottom, as in nanoGPT.
AdamW steps over `tbdiag.param_groups(model, weight_decay=0.1)` (decay / no-decay), wrapped by
`TempBalance(..., per="update")`: after every update `tb.step_update(step + 1)`, which refits each tuned
layer's alpha every ``--tb-every`` updates once ``--tb-warmup`` are done and remaps the multipliers. Tuned:
every Linear inside the blocks (attention c_attn/c_proj, MLP c_fc/c_proj); the embeddings, LayerNorms and the
LM head stay at the global rate. Prints train/val loss as it goes and, at the end, each group's effective
learning rate and the time spent rebalancing. Defaults run on a CPU in under a minute (42 s of one core
here); on a CPU busy with other work, run it with ``OMP_NUM_THREADS=1``: two threads spinning against other
processes were many times slower on the 2-core test machine.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import tbdiag
from tbdiag import TempBalance

BUILTIN_TEXT = """\
Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.

When, in disgrace with fortune and men's eyes,
I all alone beweep my outcast state,
And trouble deaf heaven with my bootless cries,
And look upon myself and curse my fate,
Wishing me like to one more rich in hope,
Featured like him, like him with friends possess'd,
Desiring this man's art and that man's scope,
With what I most enjoy contented least;
Yet in these thoughts myself almost despising,
Haply I think on thee, and then my state,
Like to the lark at break of day arising
From sullen earth, sings hymns at heaven's gate;
For thy sweet love remember'd such wealth brings
That then I scorn to change my state with kings.

Let me not to the marriage of true minds
Admit impediments. Love is not love
Which alters when it alteration finds,
Or bends with the remover to remove:
O no! it is an ever-fixed mark
That looks on tempests and is never shaken;
It is the star to every wandering bark,
Whose worth's unknown, although his height be taken.
Love's not Time's fool, though rosy lips and cheeks
Within his bending sickle's compass come:
Love alters not with his brief hours and weeks,
But bears it out even to the edge of doom.
If this be error and upon me proved,
I never writ, nor no man ever loved.

My mistress' eyes are nothing like the sun;
Coral is far more red than her lips' red;
If snow be white, why then her breasts are dun;
If hairs be wires, black wires grow on her head.
I have seen roses damask'd, red and white,
But no such roses see I in her cheeks;
And in some perfumes is there more delight
Than in the breath that from my mistress reeks.
I love to hear her speak, yet well I know
That music hath a far more pleasing sound;
I grant I never saw a goddess go;
My mistress, when she walks, treads on the ground:
And yet, by heaven, I think my love as rare
As any she belied with false compare.

That time of year thou mayst in me behold
When yellow leaves, or none, or few, do hang
Upon those boughs which shake against the cold,
Bare ruin'd choirs, where late the sweet birds sang.
In me thou see'st the twilight of such day
As after sunset fadeth in the west,
Which by and by black night doth take away,
Death's second self, that seals up all in rest.
In me thou see'st the glowing of such fire
That on the ashes of his youth doth lie,
As the death-bed whereon it must expire,
Consumed with that which it was nourish'd by.
This thou perceivest, which makes thy love more strong,
To love that well which thou must leave ere long.
"""


# ----------------------------------------------------------------------------------------------------------
# the model: B batch, T time (context), C channels (width), nh heads, hs = C // nh head size, V vocabulary

@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 64  # context length T
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128  # width C


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "the width must be a multiple of the number of heads"
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v for all heads in one matrix
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 × (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # (B, T, C) → (B, T, 4C) → (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # pre-norm residual blocks, (B, T, C) throughout
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # token embedding
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # position embedding
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))  # blocks.0 … : TempBalance's blocks
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # not tied: V is tiny here
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))
        return logits, loss


# ----------------------------------------------------------------------------------------------------------
# the learning-rate schedule: linear warm-up, then cosine decay to min_lr (nanoGPT's get_lr)

def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """The base learning rate of update ``step`` (0-based) of ``total``: ``lr·(step+1)/warmup`` during the
    warm-up, then a cosine from ``lr`` down to ``min_lr``, reached at ``total``; ``min_lr`` after."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    ratio = (step - warmup) / max(1, total - warmup)  # 0 → 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


# ----------------------------------------------------------------------------------------------------------
# data: characters → integers, first 90 % train, last 10 % validation

def read_text(path: str) -> tuple[str, str]:
    """The text and where it came from: the file at ``path`` when it exists, else the built-in sonnets."""
    if path and Path(path).is_file():
        return Path(path).read_text(encoding="utf-8"), path
    return BUILTIN_TEXT, "built-in sonnets"


def encode_split(text: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(train ids, validation ids, vocabulary): the first 90 % of the characters train, the rest validate."""
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    return data[:n], data[n:], chars


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, gen: torch.Generator):
    """``batch_size`` random windows of ``data`` (drawn with ``gen``): inputs and next-character targets."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen)  # (B,)
    x = torch.stack([data[i:i + block_size] for i in ix.tolist()])  # (B, T)
    y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix.tolist()])  # (B, T)
    return x, y


@torch.no_grad()
def estimate_loss(model: GPT, data: torch.Tensor, batches: int, batch_size: int, seed: int = 1234) -> float:
    """Mean loss over ``batches`` random batches, the same windows on every call (a fixed generator)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    losses = [model(*get_batch(data, batch_size, model.cfg.block_size, gen))[1].item() for _ in range(batches)]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def full_loss(model: GPT, data: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-character loss over every non-overlapping window of ``data`` (exact, deterministic)."""
    model.eval()
    T = model.cfg.block_size
    n = (len(data) - 1) // T
    x = data[:n * T].view(n, T)  # (n, T)
    y = data[1:n * T + 1].view(n, T)
    total = sum(F.cross_entropy(model(x[i:i + batch_size])[0].flatten(0, 1), y[i:i + batch_size].flatten(),
                                reduction="sum").item() for i in range(0, n, batch_size))
    model.train()
    return total / (n * T)


# ----------------------------------------------------------------------------------------------------------
# training

@dataclass
class Options:
    data: str = "../shared/data/tinyshakespeare/input.txt"
    steps: int = 200
    layers: int = 4
    heads: int = 4
    width: int = 128
    block: int = 64  # context length
    batch: int = 16
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 20  # learning-rate warm-up, in updates
    tempbalance: bool = True
    unit: str = "layer"  # or "block"
    min_ratio: float = 0.5
    max_ratio: float = 1.5
    tb_every: int = 25  # refit alphas every this many updates …
    tb_warmup: int = 50  # … once this many are done (multipliers 1 until then)
    eval_every: int = 50
    eval_batches: int = 10
    full_val: bool = False  # the final validation loss over the whole split (else eval_batches batches)
    seed: int = 0
    quiet: bool = False


def train(o: Options, text: str | None = None) -> dict:
    """Train one model as ``o`` says and return what was measured (losses, times, multipliers)."""
    say = (lambda *a: None) if o.quiet else print
    if text is None:
        text, source = read_text(o.data)
        say(f"data: {source}, {len(text):,} characters")
    train_data, val_data, chars = encode_split(text)

    torch.manual_seed(o.seed)  # the model's initial weights
    batch_gen = torch.Generator().manual_seed(o.seed)  # the data order: the same with or without TempBalance
    model = GPT(GPTConfig(vocab_size=len(chars), block_size=o.block, n_layer=o.layers, n_head=o.heads, n_embd=o.width))
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {o.layers} blocks, width {o.width}, {o.heads} heads, context {o.block}, vocabulary {len(chars)}: "
        f"{n_params / 1e6:.2f}M parameters")

    opt = torch.optim.AdamW(tbdiag.param_groups(model, weight_decay=0.1), lr=o.lr, betas=(0.9, 0.99))
    tb = None
    if o.tempbalance:
        tb = TempBalance(model, opt, per="update", every=o.tb_every, warmup=o.tb_warmup, unit=o.unit,
                         min_ratio=o.min_ratio, max_ratio=o.max_ratio, device="cpu")
        say(f"TempBalance: {len(tb.units)} tuned {o.unit}s, ratios {o.min_ratio:g}–{o.max_ratio:g}, "
            f"refit every {o.tb_every} updates after {o.tb_warmup}")

    history = []
    t0 = time.perf_counter()
    for step in range(o.steps):
        lr = lr_at(step, o.lr, o.min_lr, o.warmup, o.steps)
        for group in opt.param_groups:  # the base rate; TempBalance's hook scales it by lr_scale in the step
            group["lr"] = lr
        x, y = get_batch(train_data, o.batch, o.block, batch_gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if tb is not None:
            tb.step_update(step + 1)
        if (step + 1) % o.eval_every == 0 or step + 1 == o.steps:
            val = estimate_loss(model, val_data, o.eval_batches, o.batch)
            history.append({"step": step + 1, "train_loss": loss.item(), "val_loss": val, "lr": lr})
            say(f"step {step + 1:5d}: train loss {loss.item():.4f}, val loss {val:.4f}, lr {lr:.2e}")
    train_s = time.perf_counter() - t0

    result = {"n_params": n_params, "train_s": train_s, "history": history, "final_train_loss": loss.item(),
              "val_loss": full_loss(model, val_data) if o.full_val else history[-1]["val_loss"],
              "balance_s": tb.total_balance_s if tb else 0.0, "n_balances": tb.n_balances if tb else 0,
              "multipliers": tb.multipliers if tb else {}, "alphas": dict(tb.values) if tb else {},
              "effective_lrs": tb.effective_lrs() if tb else {"all": lr}}
    if o.full_val:
        say(f"final validation loss (whole split): {result['val_loss']:.4f}")
    if tb is not None:
        alphas: dict[str, list[float]] = {}  # each unit's layers' alphas (a block has several)
        for t in tb.layers:
            alphas.setdefault(t.unit, []).append(tb.values.get(t.name, math.nan))
        groups: dict[str, list[str]] = {}  # each unit's param groups: weights, and biases/norms (:no_decay)
        for g in opt.param_groups:
            groups.setdefault(g["unit"], []).append(g["name"])
        say(f"effective learning rates at the last update (base {lr:.2e} × multiplier), by param group:")
        for unit, names in groups.items():
            a = alphas.get(unit)
            alpha = f"alpha {sum(a) / len(a):5.2f}" if a else " " * 11
            rates = sorted({result["effective_lrs"][n] for n in names})
            say(f"  {' + '.join(names):60s} {alpha}  × {tb.multipliers[unit]:.3f}  lr "
                + ", ".join(f"{r:.3e}" for r in rates))
        say(f"TempBalance: {tb.n_balances} rebalances in {tb.total_balance_s:.3f} s "
            f"({100 * tb.total_balance_s / train_s:.2f} % of {train_s:.1f} s training)")
    else:
        say(f"no TempBalance: every group at lr {lr:.2e}; training took {train_s:.1f} s")
    return result


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Options):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool" and f.default:
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false")
        elif f.type == "bool":
            parser.add_argument(flag, action="store_true")
        elif f.name == "unit":
            parser.add_argument(flag, default=f.default, choices=("layer", "block"))
        else:
            parser.add_argument(flag, type={"str": str, "int": int, "float": float}[f.type], default=f.default)
    return Options(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    train(parse_options())
