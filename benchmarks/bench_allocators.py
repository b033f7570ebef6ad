"""Measured effect of the alpha-based allocations: pruning sparsity, weight decay and LoRA ranks, each against
the uniform allocation of the same budget.

    nice -n 10 python benchmarks/bench_allocators.py [--parts a,b,c] [--seeds 3] [--out bench_allocators.json]
    nice -n 10 python benchmarks/bench_allocators.py --quick        # a smoke run of every part, ~1 minute

The full run (3 seeds) took 17.7 minutes of wall time on the 2-core test machine shared with other work
(b 8.9, a-i 1.5, a-ii 2.6, c 4.6 min).

(a) **Pruning** (AlphaPruning). One-shot magnitude pruning, no retraining: every tuned unit (the rule of
    `recommend`: the Linears inside the LM's blocks; the CNN's conv2, fc1, fc2) gets a sparsity, and each of
    its weight matrices loses exactly round(s·n) of its smallest-magnitude entries. ``uniform``: s = S
    everywhere; ``alpha``: ``allocation(analysis, "sparsity", sparsity=S, epsilon=ε)`` per layer (for the LM
    also ``alpha-block``: one sparsity per transformer block from its mean alpha, as AlphaPruning does for
    LLMs); its parameter-weighted mean is S as well. Layers outside the tuned units (embeddings, LM head,
    the CNN's first conv and last Linear) stay dense in both. Alphas: the ``median`` fit (TempBalance's and
    AlphaPruning's). Measured at S = 50 %, 70 %, 80 % on (i) the character-level transformer LM of
    ``examples/nanogpt_tempbalance.py`` (4 blocks, width 64, context 64: 0.2M parameters) trained with AdamW
    on tiny Shakespeare (the first 90 % of the characters train, the last 10 % validate; validation loss in
    nats/char) and (ii) a LeNet-5-style CNN trained one epoch on MNIST (test accuracy over the 10,000 test
    images); one trained model per seed.
(b) **Weight decay** (AlphaDecay). The LM trained 500 updates with AdamW (β 0.9/0.99, lr 3e-3, warm-up +
    cosine, clipping 1), weight decay ``--weight-decay`` (0.1) on matrices, ``uniform`` vs ``TempBalance(model,
    opt, target="weight_decay", per="update", every=25, warmup=50)`` (linear map 0.5–1.5: higher alpha → more
    decay); the same initial weights and batches per seed. The uniform runs are the models pruned in (a-i).
(c) **LoRA ranks**. The LM pretrained on the first half of the text, then fine-tuned with PEFT LoRA (only the
    adapters train) on the characters from 50 % to 90 % (validation: the last 10 %), on every tuned Linear:
    ``uniform`` rank 8 on each vs ``allocation(analysis, "lora_rank", budget=8·n, r_min=2, r_max=32,
    lora_alpha=16)`` → ``peft.LoraConfig(**doc["peft"])``: the same rank sum, lora_alpha/r = 2 on every module.
    (Equal rank sum, not equal parameter count: the modules differ in shape; both counts are printed.)

LM validation loss is the mean next-character loss over every ``--val-stride``-th non-overlapping window of
the validation split (default: all of them; the same windows for every method). Prints every run as it goes,
then the tables (mean ± std over seeds, the paired difference alpha − uniform and the seeds alpha won), again
all together at the end; writes every number (per seed, per layer: alpha, allocated sparsity and the zeros
counted after pruning, ranks, weight-decay multipliers) to ``--out`` after each part. Single-threaded by
default: two OpenMP threads on a CPU shared with other work were many times slower on the 2-core test machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import tbdiag
from tbdiag import TempBalance
from tbdiag.allocation.recommend import allocation

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from nanogpt_tempbalance import BUILTIN_TEXT, GPT, GPTConfig, get_batch, lr_at  # noqa: E402

SPARSITIES = (0.5, 0.7, 0.8)
FIT = "median"  # TempBalance's and AlphaPruning's estimator (xmin at the median eigenvalue)


@dataclass
class Settings:
    """Sizes of every part (``FULL`` and ``QUICK`` below)."""

    # the LM (a-i, b, c)
    lm_layers: int = 4
    lm_width: int = 64
    lm_heads: int = 4
    lm_block: int = 64
    lm_batch: int = 32
    lm_steps: int = 500  # 1.0M characters, about one pass over the training split
    lm_lr: float = 3e-3
    lm_warmup: int = 30
    weight_decay: float = 0.1
    tb_every: int = 25
    tb_warmup: int = 50
    val_stride: int = 1  # every validation window
    # the CNN (a-ii)
    cnn_steps: int = 469  # one epoch of 60,000 at 128
    cnn_batch: int = 128
    cnn_lr: float = 0.05
    cnn_warmup: int = 30
    cnn_test: int = 0  # test images (0: all)
    # LoRA (c)
    lora_pretrain_steps: int = 400
    lora_steps: int = 150
    lora_lr: float = 3e-3
    lora_rank: int = 8  # uniform rank; the budget is this × the number of tuned Linears
    lora_r_min: int = 2
    lora_r_max: int = 32
    lora_alpha: float = 16.0
    # pruning
    epsilon: float = 0.3


FULL = Settings()
QUICK = Settings(lm_layers=2, lm_block=32, lm_batch=8, lm_steps=40, lm_warmup=5, tb_every=10, tb_warmup=10,
                 val_stride=20, cnn_steps=40, cnn_batch=64, cnn_warmup=5, cnn_test=2000, lora_pretrain_steps=40,
                 lora_steps=20)


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def say(*a: object) -> None:
    print(*a, flush=True)


TABLES: list[str] = []  # every table line, printed again together at the end


def tsay(line: str) -> None:
    say(line)
    TABLES.append(line)


# ----------------------------------------------------------------------------------------------------------
# pruning: allocation → per-layer sparsity → magnitude pruning to exactly round(s·n) zeros per matrix

def layer_sparsities(analysis: tbdiag.Analysis, target: float, how: str, epsilon: float = 0.3) -> tuple[dict, dict]:
    """``({layer: sparsity}, allocation document)`` for ``how`` = ``uniform`` (S on every tuned layer),
    ``alpha`` (AlphaPruning per layer) or ``alpha-block`` (per block); the same tuned layers in all three."""
    unit = "block" if how == "alpha-block" else "layer"
    doc = allocation(analysis, "sparsity", unit=unit, sparsity=target, epsilon=epsilon if how != "uniform" else 0.0)
    out = {}
    for g in doc["layers"].values():
        for name in g["layers"]:
            out[name] = target if how == "uniform" else g["sparsity"]
    return out, doc


def magnitude_prune_(model: nn.Module, sparsities: dict[str, float]) -> dict[str, dict]:
    """Zero the round(s·n) smallest-magnitude weights of each named layer, in place; per layer ``n``, the
    allocated ``sparsity`` and the realised ``zeros`` (counted after pruning)."""
    out = {}
    for name, s in sparsities.items():
        w = model.get_submodule(name).weight
        with torch.no_grad():
            flat = w.view(-1)
            k = min(flat.numel(), round(s * flat.numel()))
            if k:
                flat[torch.topk(flat.abs(), k, largest=False, sorted=False).indices] = 0.0
        out[name] = {"n": w.numel(), "sparsity": s, "zeros": int((w == 0).sum())}
    return out


def prune_sweep(model: nn.Module, evaluate: Callable[[nn.Module], float], sparsities=SPARSITIES,
                hows=("uniform", "alpha"), epsilon: float = 0.3) -> dict:
    """Dense score, then for each target sparsity and allocation the score of a pruned copy of ``model``,
    with the per-layer allocation and realised zeros. Alphas come from the dense model (one analysis)."""
    analysis = tbdiag.analyze(model, fit=FIT)
    alphas = {r.name: r.alpha for r in analysis.layers}
    result = {"dense": evaluate(model), "runs": []}
    for target in sparsities:
        for how in hows:
            alloc, doc = layer_sparsities(analysis, target, how, epsilon)
            pruned = copy.deepcopy(model)
            layers = magnitude_prune_(pruned, alloc)
            for name, row in layers.items():
                row["alpha"] = alphas[name] if math.isfinite(alphas[name]) else None
            n = sum(r["n"] for r in layers.values())
            result["runs"].append({"target": target, "allocation": how, "score": evaluate(pruned),
                                   "realised": sum(r["zeros"] for r in layers.values()) / n, "n_pruned_params": n,
                                   "layers": layers, "units": {u: g.get("sparsity") for u, g in doc["layers"].items()}})
            del pruned
    return result


# ----------------------------------------------------------------------------------------------------------
# the LM: data, training (AdamW, optionally AlphaDecay through TempBalance), validation loss

def encode(text: str) -> tuple[torch.Tensor, list[str]]:
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    return torch.tensor([stoi[c] for c in text], dtype=torch.long), chars


@torch.no_grad()
def lm_val_loss(model: GPT, ids: torch.Tensor, stride: int = 1, batch: int = 64) -> float:
    """Mean next-character loss over every ``stride``-th non-overlapping window of ``ids``."""
    was = model.training
    model.eval()
    T = model.cfg.block_size
    starts = torch.arange(0, len(ids) - T - 1, T)[::stride]
    x = torch.stack([ids[s:s + T] for s in starts.tolist()])
    y = torch.stack([ids[s + 1:s + T + 1] for s in starts.tolist()])
    total = sum(F.cross_entropy(model(x[i:i + batch])[0].flatten(0, 1), y[i:i + batch].flatten(),
                                reduction="sum").item() for i in range(0, len(x), batch))
    model.train(was)
    return total / y.numel()


def new_lm(s: Settings, vocab: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=s.lm_block, n_layer=s.lm_layers, n_head=s.lm_heads,
                         n_embd=s.lm_width))


def fit(model: GPT, opt: torch.optim.Optimizer, s: Settings, ids: torch.Tensor, gen: torch.Generator, steps: int,
        lr: float, warmup: int, clip: float | None = None, after: Callable[[int], object] | None = None) -> float:
    """``steps`` updates on random windows of ``ids`` (drawn with ``gen``), warm-up + cosine from ``lr`` to
    lr/10; ``after(updates done)`` after each. Returns the last training loss."""
    for step in range(steps):
        rate = lr_at(step, lr, lr / 10, warmup, steps)
        for g in opt.param_groups:  # TempBalance's step hooks scale what they must on top of this
            g["lr"] = rate
        _, loss = model(*get_batch(ids, s.lm_batch, s.lm_block, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if after is not None:
            after(step + 1)
    return loss.item()


def train_lm(s: Settings, ids: torch.Tensor, vocab: int, seed: int, *, alpha_decay: bool = False,
             steps: int | None = None) -> tuple[GPT, dict]:
    """AdamW (β 0.9/0.99, weight decay on matrices, clipping 1) with warm-up + cosine to lr/10; with
    ``alpha_decay`` wrapped by TempBalance(target="weight_decay"). The seed fixes weights and batches."""
    steps = s.lm_steps if steps is None else steps
    model = new_lm(s, vocab, seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(tbdiag.param_groups(model, weight_decay=s.weight_decay), lr=s.lm_lr, betas=(0.9, 0.99))
    tb = (TempBalance(model, opt, target="weight_decay", per="update", every=s.tb_every, warmup=s.tb_warmup,
                      device="cpu") if alpha_decay else None)
    t0 = time.perf_counter()
    last = fit(model, opt, s, ids, gen, steps, s.lm_lr, s.lm_warmup, clip=1.0,
               after=tb.step_update if tb is not None else None)
    info = {"train_s": time.perf_counter() - t0, "final_train_loss": last, "steps": steps}
    if tb is not None:
        info.update(multipliers=tb.multipliers, alphas=dict(tb.values), n_balances=tb.n_balances,
                    balance_s=tb.total_balance_s, weight_decays=tb.effective_weight_decays())
    return model, info


# ----------------------------------------------------------------------------------------------------------
# the CNN on MNIST

def load_mnist(path: str, quick_fallback: bool):
    from tbdiag.train.data import load_dataset

    if Path(path).is_dir():
        return load_dataset("mnist", path), "mnist"
    if not quick_fallback:
        raise SystemExit(f"error: {path}: no MNIST folder; pass --mnist (or --quick, which falls back to synthetic)")
    say(f"warning: {path} not found, using synthetic 28×28 images (numbers not comparable)")
    return load_dataset("synthetic", None, image_shape=(1, 28, 28), synthetic_size=2048), "synthetic"


def _norm(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - 0.1307) / 0.3081


class LeNet5(nn.Module):
    """LeNet-5-style: two 5×5 conv → ReLU → 2×2 max-pool stages (16, 32 channels), then Linear 512 → 256 →
    128 → classes. Tuned (allocated) layers: conv2, fc1, fc2 (conv1 and fc3 are the input and output layers)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 28, 28) -> (B, classes)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 16, 12, 12)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, 4, 4)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def train_cnn(s: Settings, data, seed: int) -> tuple[nn.Module, dict]:
    """LeNet5: SGD, Nesterov momentum 0.9, weight decay 5e-4, linear warm-up then cosine, shuffled epochs."""
    torch.manual_seed(seed)
    model = LeNet5(in_channels=data.x_train.shape[1], num_classes=data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=s.cnn_lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(data.x_train), generator=gen), 0
    t0 = time.perf_counter()
    model.train()
    for step in range(s.cnn_steps):
        if pos + s.cnn_batch > len(order):
            order, pos = torch.randperm(len(data.x_train), generator=gen), 0
        i = order[pos:pos + s.cnn_batch]
        pos += s.cnn_batch
        for g in opt.param_groups:
            warm = min(1.0, (step + 1) / s.cnn_warmup)
            g["lr"] = s.cnn_lr * warm * 0.5 * (1 + math.cos(math.pi * step / s.cnn_steps))
        loss = F.cross_entropy(model(_norm(data.x_train[i])), data.y_train[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, {"train_s": time.perf_counter() - t0, "final_train_loss": loss.item(), "steps": s.cnn_steps}


@torch.no_grad()
def cnn_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    was = model.training
    model.eval()
    right = sum((model(_norm(x[i:i + batch])).argmax(1) == y[i:i + batch]).sum().item()
                for i in range(0, len(x), batch))
    model.train(was)
    return 100.0 * right / len(x)


# ----------------------------------------------------------------------------------------------------------
# LoRA

def lora_finetune(s: Settings, base: GPT, ids: torch.Tensor, seed: int, peft_kwargs: dict) -> tuple[GPT, dict]:
    """A LoRA adapter (``peft.LoraConfig(**peft_kwargs)``, dropout 0) on a copy of ``base``, trained with AdamW
    (no weight decay, warm-up + cosine); returns the adapted model and what was measured."""
    import peft

    torch.manual_seed(seed)  # the adapters' initial A matrices
    wrapped = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(lora_dropout=0.0, **peft_kwargs))
    model = wrapped.get_base_model()  # the GPT with LoRA layers injected
    params = [p for p in model.parameters() if p.requires_grad]
    ranks = {n.removesuffix(".lora_A.default"): m.out_features for n, m in model.named_modules()
             if n.endswith(".lora_A.default")}
    scaling = sorted({v for m in model.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)
                      for v in m.scaling.values()})
    opt = torch.optim.AdamW(params, lr=s.lora_lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(1000 + seed)
    t0 = time.perf_counter()
    last = fit(model, opt, s, ids, gen, s.lora_steps, s.lora_lr, max(1, s.lora_steps // 10))
    return model, {"train_s": time.perf_counter() - t0, "final_train_loss": last, "ranks": ranks,
                   "rank_sum": sum(ranks.values()), "trainable_params": sum(p.numel() for p in params),
                   "scaling": scaling}


# ----------------------------------------------------------------------------------------------------------
# the parts

def part_pruning(models: dict[int, nn.Module], evaluate: Callable, hows: tuple[str, ...], epsilon: float,
                 sparsities=SPARSITIES, label: str = "") -> dict:
    out = {}
    for seed, model in models.items():
        t = time.perf_counter()
        r = prune_sweep(model, evaluate, sparsities, hows, epsilon)
        out[seed] = r
        cells = "  ".join(f"{x['target']:.0%} {x['allocation']} {x['score']:.4g}" for x in r["runs"])
        say(f"  {label} seed {seed}: dense {r['dense']:.4g}  {cells}  ({time.perf_counter() - t:.0f} s)")
    return out


def pruning_table(per_seed: dict, hows: tuple[str, ...], metric: str, higher_better: bool) -> dict:
    """Rows by target sparsity: per allocation mean ± std, per seed, realised sparsity; alpha − uniform paired."""
    seeds = sorted(per_seed)
    dense = [per_seed[s]["dense"] for s in seeds]
    tsay(f"  dense: {mean_sd(dense)[0]:.4f} ± {mean_sd(dense)[1]:.4f} {metric}  "
         f"({', '.join(f'{x:.4f}' for x in dense)})")
    head = "".join(f"{h:>26s}" for h in hows)
    tsay(f"  {'S':>4s}{head}   " + "   ".join(f"{h} − uniform (wins)" for h in hows if h != "uniform"))
    table = {"dense": {"mean": mean_sd(dense)[0], "std": mean_sd(dense)[1], "per_seed": dense}}
    for target in sorted({x["target"] for r in per_seed.values() for x in r["runs"]}):
        row, cells, diffs = {}, [], []
        for how in hows:
            runs = [next(x for x in per_seed[s]["runs"] if x["target"] == target and x["allocation"] == how)
                    for s in seeds]
            scores = [x["score"] for x in runs]
            m, sd = mean_sd(scores)
            row[how] = {"mean": m, "std": sd, "per_seed": scores, "realised": [x["realised"] for x in runs]}
            cells.append(f"{m:12.4f} ± {sd:<11.4f}")
        uni = row["uniform"]["per_seed"]
        for how in hows:
            if how == "uniform":
                continue
            d = [a - b for a, b in zip(row[how]["per_seed"], uni)]
            dm, dsd = mean_sd(d)
            wins = sum((x > 0) if higher_better else (x < 0) for x in d)
            row[how].update(diff_vs_uniform=d, diff_mean=dm, diff_std=dsd, wins=wins)
            diffs.append(f"{dm:+.4f} ± {dsd:.4f} ({wins}/{len(d)})")
        table[f"{target:g}"] = row
        tsay(f"  {target:4.0%}" + "".join(f"{c:>26s}" for c in cells) + "   " + "   ".join(diffs))
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="a,b,c", help="comma-separated from a (pruning), b (weight decay), c (LoRA)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every part (~2 min)")
    parser.add_argument("--out", default="bench_allocators.json", help="JSON of every number")
    parser.add_argument("--data", default="../shared/data/tinyshakespeare/input.txt")
    parser.add_argument("--mnist", default="../shared/data/mnist")
    parser.add_argument("--lm-steps", type=int, help=f"LM training updates (default {FULL.lm_steps})")
    parser.add_argument("--cnn-steps", type=int, help=f"CNN training updates (default {FULL.cnn_steps})")
    parser.add_argument("--lora-steps", type=int, help=f"LoRA fine-tuning updates (default {FULL.lora_steps})")
    parser.add_argument("--weight-decay", type=float,
                        help=f"AdamW weight decay of the LM (default {FULL.weight_decay})")
    parser.add_argument("--epsilon", type=float, help=f"AlphaPruning's ε (default {FULL.epsilon})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    if not parts or any(p not in ("a", "b", "c") for p in parts):
        parser.error(f"--parts {args.parts!r}: use a comma-separated subset of a,b,c")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    s = QUICK if args.quick else FULL
    s = replace(s, **{k: v for k, v in (("lm_steps", args.lm_steps), ("cnn_steps", args.cnn_steps),
                                        ("lora_steps", args.lora_steps), ("weight_decay", args.weight_decay),
                                        ("epsilon", args.epsilon)) if v is not None})
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    TABLES.clear()
    t_all = time.perf_counter()
    out: dict = {"benchmark": "bench_allocators", "quick": args.quick, "settings": asdict(s), "seeds": seeds,
                 "parts": parts, "torch_threads": torch.get_num_threads(), "fit": FIT, "sparsities": list(SPARSITIES),
                 "part_s": {}}
    t_part = time.perf_counter()

    def part_done(name: str) -> None:
        nonlocal t_part
        out["part_s"][name] = time.perf_counter() - t_part
        say(f"  [{name}: {out['part_s'][name] / 60:.1f} min]")
        t_part = time.perf_counter()
        save()

    def save() -> None:
        out["total_s"] = time.perf_counter() - t_all
        Path(args.out).write_text(json.dumps(out, indent=1))

    text_path = Path(args.data)
    if text_path.is_file():
        text, source = text_path.read_text(encoding="utf-8"), str(text_path)
    elif args.quick:
        text, source = BUILTIN_TEXT, "built-in sonnets"
        say(f"warning: {args.data} not found, using the {source} (numbers not comparable)")
    else:
        raise SystemExit(f"error: {args.data}: no such file; pass --data "
                         "(or --quick, which falls back to built-in text)")
    ids, chars = encode(text)
    n90 = int(0.9 * len(ids))
    train_ids, val_ids = ids[:n90], ids[n90:]
    out["lm_data"] = {"source": source, "chars": len(ids), "train": n90, "val": len(ids) - n90, "vocab": len(chars)}
    say(f"{source}: {len(ids):,} characters, vocabulary {len(chars)}; LM {s.lm_layers} blocks × width {s.lm_width}, "
        f"context {s.lm_block}, batch {s.lm_batch}; validation: every {s.val_stride} of the non-overlapping windows "
        f"of the last 10 %; torch threads {torch.get_num_threads()}; seeds {seeds}")
    lm_eval = lambda m: lm_val_loss(m, val_ids, s.val_stride)  # noqa: E731

    # (b), and the LMs pruned in (a-i): AdamW with uniform / alpha-based weight decay
    lm_models: dict[int, GPT] = {}
    if "a" in parts or "b" in parts:
        say(f"\n(b) LM, {s.lm_steps} updates of AdamW, weight decay {s.weight_decay:g}: uniform vs alpha-based "
            f"(TempBalance target weight_decay, every {s.tb_every} after {s.tb_warmup}, ratios 0.5–1.5)"
            + ("" if "b" in parts else " — uniform only, for (a)"))
        runs = []
        for seed in seeds:
            for alpha in ((False, True) if "b" in parts else (False,)):
                model, info = train_lm(s, train_ids, len(chars), seed, alpha_decay=alpha)
                t = time.perf_counter()
                info.update(method="alpha" if alpha else "uniform", seed=seed, val_loss=lm_eval(model),
                            eval_s=time.perf_counter() - t)
                runs.append(info)
                if not alpha:
                    lm_models[seed] = model
                extra = ""
                if alpha:
                    m = [v for k, v in info["multipliers"].items() if k != "default"]
                    extra = f", wd multipliers {min(m):.2f}–{max(m):.2f} over {len(m)} units"
                say(f"  seed {seed} {info['method']:8s} val loss {info['val_loss']:.4f} "
                    f"(train {info['final_train_loss']:.4f}), {info['train_s']:.0f} s{extra}")
        out["lm_n_params"] = sum(p.numel() for p in lm_models[seeds[0]].parameters())
        if "b" in parts:
            uni = [r["val_loss"] for r in runs if r["method"] == "uniform"]
            alp = [r["val_loss"] for r in runs if r["method"] == "alpha"]
            d = [a - u for a, u in zip(alp, uni)]
            summary = {"uniform": dict(zip(("mean", "std"), mean_sd(uni)), per_seed=uni),
                       "alpha": dict(zip(("mean", "std"), mean_sd(alp)), per_seed=alp,
                                     diff_vs_uniform=d, diff_mean=mean_sd(d)[0], diff_std=mean_sd(d)[1],
                                     wins=sum(x < 0 for x in d))}
            tsay("\n(b) LM validation loss with AdamW, uniform vs alpha-based weight decay "
                 "(nats/char, lower is better)")
            for k, row in summary.items():
                extra = (f"   alpha − uniform {row['diff_mean']:+.4f} ± {row['diff_std']:.4f} "
                         f"({row['wins']}/{len(d)} seeds better)") if k == "alpha" else ""
                per = ", ".join(f"{x:.4f}" for x in row["per_seed"])
                tsay(f"  {k:8s} {row['mean']:.4f} ± {row['std']:.4f}  ({per}){extra}")
            out["b"] = {"summary": summary, "runs": runs}
        else:
            out["a_lm_training"] = runs
        part_done("b" if "b" in parts else "a_lm_training")

    if "a" in parts:
        say(f"\n(a-i) LM magnitude pruning (no retraining) of the {len(lm_models)} uniform-decay models, "
            f"ε {s.epsilon:g}: validation loss")
        hows = ("uniform", "alpha", "alpha-block")
        per_seed = part_pruning(lm_models, lm_eval, hows, s.epsilon, label="LM")
        tsay("\n(a-i) LM validation loss after magnitude pruning, uniform vs alpha sparsity "
             "(nats/char, lower is better)")
        out["a_lm"] = {"table": pruning_table(per_seed, hows, "nats/char", higher_better=False), "per_seed": per_seed}
        part_done("a_lm")

        data, mnist_source = load_mnist(args.mnist, args.quick)
        x_test, y_test = data.x_test, data.y_test
        if s.cnn_test:
            x_test, y_test = x_test[:s.cnn_test], y_test[:s.cnn_test]
        say(f"\n(a-ii) LeNet5 on {mnist_source}: {s.cnn_steps} SGD updates of "
            f"{s.cnn_batch}; test accuracy on {len(x_test):,} images")
        cnn_models, cnn_runs = {}, []
        for seed in seeds:
            model, info = train_cnn(s, data, seed)
            info.update(seed=seed)
            cnn_runs.append(info)
            cnn_models[seed] = model
            say(f"  seed {seed} trained in {info['train_s']:.0f} s (train loss {info['final_train_loss']:.4f})")
        hows_cnn = ("uniform", "alpha")
        per_seed = part_pruning(cnn_models, lambda m: cnn_accuracy(m, x_test, y_test), hows_cnn, s.epsilon, label="CNN")
        tsay("\n(a-ii) MNIST CNN test accuracy after magnitude pruning, uniform vs alpha sparsity "
             "(%, higher is better)")
        out["a_cnn"] = {"data": mnist_source, "n_test": len(x_test), "training": cnn_runs,
                        "n_params": sum(p.numel() for p in cnn_models[seeds[0]].parameters()),
                        "table": pruning_table(per_seed, hows_cnn, "%", higher_better=True), "per_seed": per_seed}
        part_done("a_cnn")

    if "c" in parts:
        half = len(ids) // 2
        pre_ids, ft_ids = ids[:half], ids[half:n90]
        say(f"\n(c) LoRA: LM pretrained {s.lora_pretrain_steps} updates on the first half, fine-tuned "
            f"{s.lora_steps} updates on 50–90 %; uniform rank {s.lora_rank} vs alpha ranks "
            f"({s.lora_r_min}–{s.lora_r_max}) at the same rank sum, lora_alpha/r = {s.lora_alpha / s.lora_rank:g}")
        runs = []
        for seed in seeds:
            base, info = train_lm(s, pre_ids, len(chars), seed, steps=s.lora_pretrain_steps)
            base_loss = lm_eval(base)
            analysis = tbdiag.analyze(base, fit=FIT)
            n_units = len(allocation(analysis, "weight_decay")["layers"])
            budget = s.lora_rank * n_units
            doc = allocation(analysis, "lora_rank", budget=budget, r_min=s.lora_r_min, r_max=s.lora_r_max,
                             lora_alpha=s.lora_alpha)
            uniform = {"r": s.lora_rank, "lora_alpha": s.lora_alpha, "target_modules": doc["peft"]["target_modules"]}
            row = {"seed": seed, "pretrain": info, "base_val_loss": base_loss, "budget": budget,
                   "alphas": {u: g["alpha"] for u, g in doc["layers"].items()},
                   "alpha_ranks": {u: g["rank"] for u, g in doc["layers"].items()}, "peft": doc["peft"]}
            for method, kw in (("uniform", uniform), ("alpha", doc["peft"])):
                model, ft = lora_finetune(s, base, ft_ids, seed, kw)
                ft["val_loss"] = lm_eval(model)
                row[method] = ft
            runs.append(row)
            ranks = sorted(row["alpha_ranks"].values())
            say(f"  seed {seed}: pretrained val loss {base_loss:.4f}; LoRA uniform {row['uniform']['val_loss']:.4f} "
                f"({row['uniform']['trainable_params']:,} params), alpha {row['alpha']['val_loss']:.4f} "
                f"({row['alpha']['trainable_params']:,} params, ranks {ranks[0]}–{ranks[-1]}, sum "
                f"{row['alpha']['rank_sum']} = {row['uniform']['rank_sum']})")
        base = [r["base_val_loss"] for r in runs]
        uni = [r["uniform"]["val_loss"] for r in runs]
        alp = [r["alpha"]["val_loss"] for r in runs]
        d = [a - u for a, u in zip(alp, uni)]
        summary = {"pretrained": dict(zip(("mean", "std"), mean_sd(base)), per_seed=base),
                   "uniform": dict(zip(("mean", "std"), mean_sd(uni)), per_seed=uni,
                                   trainable_params=[r["uniform"]["trainable_params"] for r in runs]),
                   "alpha": dict(zip(("mean", "std"), mean_sd(alp)), per_seed=alp, diff_vs_uniform=d,
                                 diff_mean=mean_sd(d)[0], diff_std=mean_sd(d)[1], wins=sum(x < 0 for x in d),
                                 trainable_params=[r["alpha"]["trainable_params"] for r in runs])}
        tsay("\n(c) LM validation loss after LoRA fine-tuning, uniform vs alpha ranks, same rank sum "
             "(nats/char, lower is better)")
        for k, row in summary.items():
            extra = (f"   alpha − uniform {row['diff_mean']:+.4f} ± {row['diff_std']:.4f} "
                     f"({row['wins']}/{len(d)} seeds better)") if k == "alpha" else ""
            params = f"  LoRA params {row['trainable_params']}" if "trainable_params" in row else ""
            tsay(f"  {k:10s} {row['mean']:.4f} ± {row['std']:.4f}  ({', '.join(f'{x:.4f}' for x in row['per_seed'])})"
                f"{params}{extra}")
        out["c"] = {"summary": summary, "runs": runs}
        part_done("c")

    save()
    say(f"\n===== all tables (mean ± std over seeds {seeds}; Δ paired by seed; wins: seeds where alpha was better)")
    for line in TABLES:
        say(line)
    say(f"\ntotal {out['total_s'] / 60:.1f} min; wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
