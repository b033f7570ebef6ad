"""Shared fixtures: tiny seeded models and their checkpoints in every supported format and layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn


class TinyNet(nn.Module):
    """A little of everything: conv2d, conv1d, LSTM, embedding, norms, linears, and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.conv = nn.Conv2d(3, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.conv1d = nn.Conv1d(16, 24, 3)
        self.rnn = nn.LSTM(16, 12)
        self.fc1 = nn.Linear(48, 40)
        self.ln = nn.LayerNorm(40)
        self.fc2 = nn.Linear(40, 10)
        self.register_buffer("position_ids", torch.arange(8))


def make_tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyNet()


@pytest.fixture
def tiny() -> nn.Module:
    return make_tiny()


@pytest.fixture
def tiny_state(tiny: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in tiny.state_dict().items()}


def write_shards(folder: Path, state: dict[str, torch.Tensor], save, pattern: str, index_name: str) -> Path:
    """Two shards written with ``save(tensors, path)``, named by ``pattern``, with their index and a config."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    half = len(names) // 2
    weight_map = {}
    for i, keys in enumerate((names[:half], names[half:]), start=1):
        save({k: state[k] for k in keys}, folder / pattern.format(i))
        weight_map.update({k: pattern.format(i) for k in keys})
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return folder


def write_sharded_safetensors(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    return write_shards(folder, state, save_file, "model-0000{}-of-00002.safetensors", "model.safetensors.index.json")


def write_bin_shards(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    return write_shards(folder, state, torch.save, "pytorch_model-0000{}-of-00002.bin", "pytorch_model.bin.index.json")


@pytest.fixture
def all_forms(tmp_path: Path, tiny: nn.Module, tiny_state: dict) -> dict[str, object]:
    """The same weights in every supported form."""
    forms: dict[str, object] = {"module": tiny, "state_dict": tiny_state}
    p = tmp_path / "flat.safetensors"
    save_file(tiny_state, p)
    forms["safetensors"] = p
    forms["sharded_safetensors"] = write_sharded_safetensors(tmp_path / "hf_st", tiny_state)
    forms["sharded_bin"] = write_bin_shards(tmp_path / "hf_bin", tiny_state)
    single = tmp_path / "hf_single"
    single.mkdir()
    torch.save(tiny_state, single / "pytorch_model.bin")
    (single / "config.json").write_text("{}")
    forms["hf_single_bin"] = single
    for name, obj in {
        "zip.pt": tiny_state,
        "nested_state_dict.pth": {"state_dict": tiny_state, "epoch": 3},
        "nested_model_state.ckpt": {"model_state": tiny_state, "acc": 0.9},
        "nested_net.th": {"net": {f"module.{k}": v for k, v in tiny_state.items()}},
        "compiled.bin": {f"_orig_mod.{k}": v for k, v in tiny_state.items()},
        "ddp_model.pt": {"model": {f"module.{k}": v for k, v in tiny_state.items()}},
        "renamed.pkl": tiny_state,
    }.items():
        p = tmp_path / name
        torch.save(obj, p)
        forms[name] = p
    legacy = tmp_path / "legacy.pt"
    torch.save({"state_dict": tiny_state}, legacy, _use_new_zipfile_serialization=False)
    forms["legacy"] = legacy
    # A training checkpoint: model + optimizer state whose moments are 2-D too, + counters.
    model = make_tiny()
    opt = torch.optim.Adam(model.parameters())
    model.fc2(model.fc1(torch.randn(2, 48))).sum().backward()
    opt.step()
    model.load_state_dict(tiny_state)
    p = tmp_path / "training.ckpt"
    torch.save({"epoch": 7, "best_acc": 0.91, "model_state_dict": model.state_dict(),
                "optimizer_state_dict": opt.state_dict(), "scheduler": {"last_epoch": 7}}, p)
    forms["training_ckpt"] = p
    p = tmp_path / "ema.pt"
    torch.save({"ema": tiny_state, "optimizer": opt.state_dict()}, p)
    forms["ema_only"] = p
    return forms
