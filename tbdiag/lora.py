"""PEFT LoRA adapters: each adapted layer's update ΔW = s·B·A, its spectrum from an r×r problem, and W + ΔW.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``)
with ``<module>.lora_A.weight`` (r × in) and ``<module>.lora_B.weight`` (out × r) per adapted module, as
PEFT saves them (``base_model.model.`` before the module name). A convolution's factors are convolutions:
A (r, in, k…) and B (out, r, 1…), so ΔW at each kernel position is s·B·A[:, :, position], of rank ≤ r. The scale s is lora_alpha/r, or
lora_alpha/√r with ``use_rslora``; r and lora_alpha come from ``rank_pattern``/``alpha_pattern`` where a
pattern matches the module name (PEFT's rule: the name ends with the pattern after a dot, or is it), else
from ``r``/``lora_alpha``. ``fan_in_fan_out`` (GPT-2 ``Conv1D``) stores ΔW transposed.

Spectrum of ΔW without forming its Gram matrix: with B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR), ΔW =
Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ, so the non-zero eigenvalues of ΔWᵀΔW are the squared singular values of the r×r
matrix s·R_B·R_Aᵀ: r eigenvalues, O((m + n)·r²) work (a convolution: r per kernel position, pooled as
`tbdiag.layers` pools a convolution's slices). A rank-r update has only r of them; with fewer than
``min_evals`` the row is measured, not fitted (status ``too_few_evals``), and its warning says why.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tbdiag.errors import CheckpointError, TbdiagError
from tbdiag.layers import LayerSpec, selected
from tbdiag.tensors import TensorRef

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


def adapter_folder(source: object) -> Path | None:
    """The adapter folder ``source`` names (the folder, or its ``adapter_model.*`` file), or None."""
    if not isinstance(source, (str, Path)):
        return None
    path = Path(source)
    folder = path if path.is_dir() else path.parent if path.name in WEIGHTS else None
    if folder is None or not (folder / CONFIG).is_file():
        return None
    return folder if any((folder / w).is_file() for w in WEIGHTS) else None


@dataclass(frozen=True)
class AdapterLayer:
    """One adapted module: its LoRA factors (not yet read), rank and scale."""

    name: str  # the base model's layer name (module name)
    a: TensorRef  # (r, in), or (r, in, k…) for a convolution
    b: TensorRef  # (out, r), or (out, r, 1…)
    rank: int
    scale: float
    fan_in_fan_out: bool

    @property
    def kernel(self) -> tuple[int, ...]:
        """A convolution's kernel size (``()`` for a linear layer)."""
        return tuple(self.a.shape[2:])

    @property
    def kind(self) -> str:
        return {0: "linear", 1: "conv1d", 2: "conv2d", 3: "conv3d"}[len(self.kernel)]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ΔW as the base layer stores it."""
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.fan_in_fan_out else (out, inp, *self.kernel)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) in float64: B (out, r); A (r, in), or (r, in, k…) for a convolution."""
        b = self.b.load().double()
        return b.reshape(b.shape[0], b.shape[1]), self.a.load().double()

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW = s·B·A (transposed for fan_in_fan_out; a convolution's at every kernel position), as the base
        layer stores it."""
        b, a = self.factors()
        d = self.scale * torch.tensordot(b, a, dims=1)  # (out, in, k…)
        return (d.T if self.fan_in_fan_out else d).to(dtype)

    def eigenvalues(self) -> torch.Tensor:
        """The non-zero eigenvalues of ΔWᵀΔW, ascending, float64: r, or r per kernel position pooled."""
        b, a = self.factors()
        positions = a.reshape(a.shape[0], a.shape[1], -1)  # (r, in, positions)
        return torch.cat([lowrank_eigenvalues(b, positions[:, :, i], self.scale)
                          for i in range(positions.shape[2])]).sort().values


@dataclass(frozen=True)
class Adapter:
    """An opened PEFT LoRA adapter."""

    source: str
    config: dict
    layers: tuple[AdapterLayer, ...]
    skipped: int  # adapted modules whose factors are neither matrices nor convolutions, left out


def read_config(folder: Path) -> dict:
    """``adapter_config.json``, checked to describe a plain LoRA adapter."""
    where = folder / CONFIG
    try:
        config = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: not a readable adapter config ({exc}); re-save the adapter") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: not an adapter config (a JSON object); re-save the adapter")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(f"{where}: a {kind} adapter; only LoRA adapters are analysed")
    if config.get("use_dora"):
        raise CheckpointError(f"{where}: a DoRA adapter (its update is not s·B·A); merge it into the base model "
                              "(merge_and_unload) and analyse the merged model against the base instead")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise CheckpointError(f"{where}: {key} is {value!r}, not a positive number; re-save the adapter")
    return config


def pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank/alpha pattern rule: the first pattern the module name ends with (after a dot), else default."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def open_adapter(folder: Path) -> Adapter:
    """Open a PEFT LoRA adapter folder (nothing read beyond the header and config).

    Raises:
        CheckpointError: a bad config, an unpaired or misshapen lora_A/lora_B, or a rank that is not the
            config's.
    """
    from tbdiag.checkpoint import open_checkpoint

    config = read_config(folder)
    weights = next(folder / w for w in WEIGHTS if (folder / w).is_file())
    parts: dict[str, dict[str, TensorRef]] = {}
    for ref in open_checkpoint(weights).tensors:
        found = LORA_KEY.match(ref.name)
        if found:
            parts.setdefault(found["module"], {})[found["part"]] = ref
    layers, skipped = [], 0
    for module, pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{weights}: {module} has lora_{''.join(pair)} without its partner; re-save the adapter")
        a, b = pair["A"], pair["B"]
        if not (2 <= len(a.shape) <= 5 and len(b.shape) == len(a.shape) and all(k == 1 for k in b.shape[2:])):
            skipped += 1  # not a linear or convolution LoRA pair
            continue
        layers.append(_layer(module, a, b, config, weights))
    if not layers:
        raise CheckpointError(f"{weights}: no LoRA layer found; pass a PEFT LoRA adapter folder")
    return Adapter(str(folder), config, tuple(layers), skipped)


def _layer(module: str, a: TensorRef, b: TensorRef, config: dict, where: Path) -> AdapterLayer:
    rank = a.shape[0]
    if b.shape[1] != rank:
        raise CheckpointError(f"{where}: {module}: lora_B is {list(b.shape)}, lora_A {list(a.shape)}: their ranks "
                              "differ; re-save the adapter")
    r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    if r != rank:
        raise CheckpointError(f"{where}: {module} has rank {rank} but the config says {r}; pass the config saved "
                              "with these weights")
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return AdapterLayer(module, a, b, rank, scale, bool(config.get("fan_in_fan_out")))


def lowrank_eigenvalues(b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """The r non-zero eigenvalues of ΔWᵀΔW for ΔW = scale·B·A, ascending (module docstring), float64."""
    r_b = torch.linalg.qr(b.double(), mode="r").R  # (r, r)
    r_a = torch.linalg.qr(a.double().T, mode="r").R  # (r, r)
    s = torch.linalg.svdvals(scale * (r_b @ r_a.T))
    return s.square().sort().values


@dataclass(frozen=True)
class LowRankSpec(LayerSpec):
    """A layer whose matrix is a low-rank update: `analysis` takes its eigenvalues from `lowrank_eigenvalues`."""

    layer: AdapterLayer | None = field(default=None, repr=False, compare=False)

    @property
    def n_evals(self) -> int:
        """r (at most the matrix's smaller side) per matrix."""
        return min(self.layer.rank, self.shape[0], self.shape[1]) * self.n_matrices if self.layer else 0

    @property
    def cost(self) -> float:
        m, n = self.shape[0], self.shape[1]
        return float(m + n) * self.n_evals * (self.layer.rank if self.layer else 0)


def adapter_specs(adapter: Adapter, base_refs: dict[str, TensorRef] | None, *, include: tuple[str, ...] = (),
                  exclude: tuple[str, ...] = ()) -> tuple[list[LayerSpec], dict[str, int]]:
    """Specs of the adapted layers: ΔW (low rank) without ``base_refs``, W + ΔW with them (base layer name →
    its weight).

    Raises:
        TbdiagError: an adapted layer missing from the base, or of another shape there.
    """
    specs: list[LayerSpec] = []
    skipped = {"excluded": 0, "adapter_other": adapter.skipped}
    for layer in adapter.layers:
        if not selected(layer.name, include, exclude):
            skipped["excluded"] += 1
            continue
        if base_refs is None:
            ref = TensorRef(layer.name, layer.shape, torch.float64, load=layer.delta)
            specs.append(LowRankSpec(layer.name, layer.kind, layer.shape, ref, layer.name, layer=layer))
            continue
        base = base_refs.get(layer.name)
        if base is None:
            raise TbdiagError(f"{adapter.source}: adapted layer {layer.name} is not a layer of the base model; pass the "
                              "base model the adapter was trained on")
        if tuple(base.shape) != layer.shape:
            raise TbdiagError(f"{adapter.source}: {layer.name} is {list(layer.shape)} in the adapter but "
                              f"{list(base.shape)} in the base model; pass the base model the adapter was trained on")
        ref = dataclasses.replace(base, load=_merged(base, layer), load_rows=None)
        specs.append(LayerSpec(layer.name, layer.kind, layer.shape, ref, layer.name))
    return specs, skipped


def _merged(base: TensorRef, layer: AdapterLayer) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        w = base.load()
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        return w.to(dtype) + layer.delta(dtype)
    return load
