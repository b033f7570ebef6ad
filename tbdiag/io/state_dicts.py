"""PyTorch objects as named tensors: a file read with ``torch.load(weights_only=True)`` (full unpickling only
on ``trust_pickle``), the state dict nested in a training checkpoint, and a live module's parameters. Tied
weights (an embedding shared with the LM head) are listed once."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from tbdiag.errors import CheckpointError
from tbdiag.esd.layers import is_transposed_linear, kind_of_module
from tbdiag.io.tensors import TensorRef, clean_name

log = logging.getLogger(__name__)

# Keys under which training scripts nest the model's weights, most specific first.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "network",
                  "ema", "model_ema", "state_dict_ema", "ema_state_dict", "params", "weights")
# Subtrees of a training checkpoint that hold tensors which are not weights (optimizer moments …).
NON_WEIGHT_KEY = re.compile(r"optim|sched|scaler|grad|momentum|rng", re.IGNORECASE)

def torch_load(path: Path, *, mmap: bool, trust_pickle: bool) -> Any:
    try:
        if trust_pickle:
            log.warning("%s: loading with full unpickling (trust_pickle=True)", path)
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)  # explicit trust opt-in
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except MemoryError:
        raise
    except Exception as exc:  # torch raises many types for a bad file; all mean the same to the user
        text = str(exc)
        if "Weights only load failed" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(f"{path}: unpickling it would run code{what}; re-run with trust_pickle=True only "
                                  "if you trust its origin, or re-save it as a plain state dict", cli={"trust_pickle=True": "--trust-pickle"}) from exc
        first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first_line[:120]}); "
                              "re-save or re-download it") from exc


def select_state_dict(obj: Any, key: str | None, where: str) -> Mapping:
    """Find the mapping that holds a checkpoint's weights.

    Descends through container keys (``state_dict``, ``model``, ``module`` …) or ``key`` when given,
    and converts a pickled ``nn.Module`` to its state dict.
    """
    if key:
        for part in key.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                raise CheckpointError(f"{where}: no entry '{key}' in the checkpoint; check the key",
                                      cli={"check the key": "check --key"})
            obj = obj[part]
    while True:
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{where}: holds a {type(obj).__name__}, not a state dict; "
                                  "pass a checkpoint of named tensors")
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in CONTAINER_KEYS if k in obj and _holds_tensor(obj[k])), None)
        if inner is None:
            return obj
        obj = inner


def _holds_tensor(obj: Any) -> bool:
    if isinstance(obj, (torch.Tensor, torch.nn.Module)):
        return True
    return isinstance(obj, Mapping) and any(_holds_tensor(v) for v in obj.values())


def _flatten(obj: Mapping, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    out = []
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out.append((name, v))
        elif isinstance(v, Mapping) and not NON_WEIGHT_KEY.search(str(k)) and "param_groups" not in v:
            out.extend(_flatten(v, name + "."))
    return out


def mapping_refs(obj: Any, key: str | None, where: str) -> list[TensorRef]:
    state = select_state_dict(obj, key, where)
    refs, seen, views = [], set(), set()
    for name, t in _flatten(state):
        name = clean_name(name)
        if name in seen:
            log.warning("%s: tensor %s appears twice; keeping the first", where, name)
            continue
        seen.add(name)
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and t.device.type != "meta" and view in views:  # a tied weight (embedding = LM head)
            log.info("%s: %s shares its storage with an earlier tensor; analysed once", where, name)
            continue
        views.add(view)
        refs.append(TensorRef(name, tuple(t.shape), t.dtype, load=_loader(t, name, where)))
    return refs


def _loader(t: torch.Tensor, name: str, where: str) -> Callable[[], torch.Tensor]:
    """A tensor as it is; one on the meta device (shapes, no values: planned, never read) refused when read."""
    def load() -> torch.Tensor:
        if t.device.type == "meta":
            raise CheckpointError(f"{where}: tensor {name} has no values (it is on the meta device); load or "
                                  "initialise the weights before analysing or pruning them")
        return t
    return load


def module_refs(module: torch.nn.Module) -> list[TensorRef]:
    refs, seen = [], set()
    for mname, mod in module.named_modules():
        hint, transposed = kind_of_module(mod), is_transposed_linear(mod)
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:  # a tied weight (e.g. embedding and LM head) is analysed once
                continue
            seen.add(id(p))
            name = clean_name(f"{mname}.{pname}" if mname else pname)
            refs.append(TensorRef(name, tuple(p.shape), p.dtype, load=_loader(p.detach(), name, "<module>"),
                                  kind_hint=hint if pname.startswith("weight") or pname.endswith("_weight") else None,
                                  transposed=transposed and pname == "weight"))
    return refs
