"""PEFT LoRA adapters: each adapted layer's update ΔW = s·B·A, its spectrum from an r×r problem, and W + ΔW.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``) with, per
adapted module (`LORA_KEY`), ``<module>.lora_A.weight`` (r × in) and ``lora_B.weight`` (out × r), or an
embedding's ``lora_embedding_A`` (r × num_embeddings) and ``lora_embedding_B`` (dim × r), whose ΔW =
s·(B·A)ᵀ is stored like the embedding. A convolution's A is (r, in, k…) and B (out, r, 1…): ΔW at each
kernel position is s·B·A[:, :, position], of rank ≤ r. s = lora_alpha/r, or lora_alpha/√r with
``use_rslora``; r and lora_alpha come from ``rank_pattern``/``alpha_pattern`` where a key matches the module
(`tbdiag.finetune.lora_config`), else ``r``/``lora_alpha``. ``fan_in_fan_out`` (GPT-2 ``Conv1D``) stores ΔW
transposed. Factors are read in float64, and W + ΔW is formed in float64 when W is.

``modules_to_save`` (full copies of modules trained with the adapter, e.g. a classifier head) are no update:
the ``delta`` view leaves them out (``skipped.modules_to_save``, named in a warning), the ``merged`` view
analyses them as the merged model's weights. Embedding updates and saved modules are analysed whatever
``include_embeddings`` says (the adapter names what was trained). Other matrices (factor pairs of other
shapes; base layers PEFT saves beside adapted embeddings, logged as info) are left out: ``skipped.adapter_other``.

Spectrum of ΔW without its Gram matrix: with B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR), ΔW = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ,
so the non-zero eigenvalues of ΔWᵀΔW are the squared singular values of the r×r matrix s·R_B·R_Aᵀ:
O((m + n)·r²) work (a convolution: r per kernel position, pooled). With fewer than ``min_evals`` of them
the row is measured, not fitted (status ``too_few_evals``), and its warning says why.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tbdiag.errors import CheckpointError, TbdiagError
from tbdiag.esd.layers import LayerSpec, layer_name, plan_layers, selected
from tbdiag.finetune.lora_config import pattern_value, read_config
from tbdiag.io.checkpoint import ADAPTER_WEIGHTS
from tbdiag.io.tensors import Checkpoint, TensorRef

log = logging.getLogger(__name__)

PREFIX = "base_model.model."
# The one statement of PEFT's factor names: lora_A/lora_B (…weight, the adapter name before it when unsaved),
# or an embedding's lora_embedding_A/_B (no .weight).
LORA_KEY = re.compile(rf"^(?:{re.escape(PREFIX)})?(?P<module>.+)\.lora_(?:(?P<part>[AB])(?:\.[^.]+)?\.weight"
                      r"|embedding_(?P<embedding>[AB])(?:\.[^.]+)?)$")
LORA_FORMAT = "peft-lora"  # the format of an analysis (and a plan) read from a PEFT LoRA adapter folder


@dataclass(frozen=True)
class AdapterLayer:
    """One adapted module: its LoRA factors (not yet read), rank and scale."""

    name: str  # the base model's layer name (module name)
    a: TensorRef  # (r, in), or (r, in, k…) for a convolution
    b: TensorRef  # (out, r), or (out, r, 1…)
    rank: int
    scale: float
    transposed: bool  # ΔW stored in × out: fan_in_fan_out (GPT-2 Conv1D) and every embedding ((B·A)ᵀ)
    embedding: bool = False

    @property
    def kernel(self) -> tuple[int, ...]:
        """A convolution's kernel size (``()`` for a linear layer)."""
        return tuple(self.a.shape[2:])

    @property
    def kind(self) -> str:
        return "embedding" if self.embedding else ("linear", "conv1d", "conv2d", "conv3d")[len(self.kernel)]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ΔW as the base layer stores it."""
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.transposed else (out, inp, *self.kernel)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) in float64: B (out, r); A (r, in), or (r, in, k…) for a convolution."""
        b = self.b.load().double()
        return b.reshape(b.shape[0], b.shape[1]), self.a.load().double()

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW = s·B·A (transposed for fan_in_fan_out and embeddings; a convolution's at every kernel
        position), as the base layer stores it, computed in float64."""
        b, a = self.factors()
        d = self.scale * torch.tensordot(b, a, dims=1)  # (out, in, k…)
        return (d.T if self.transposed else d).to(dtype)

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
    saved: tuple[TensorRef, ...] = ()  # modules_to_save weights, named as in the base model
    other: tuple[str, ...] = ()  # the other matrices of the file, left out


def open_adapter(folder: Path) -> Adapter:
    """Open a PEFT LoRA adapter folder (nothing read beyond the header and config).

    Raises:
        CheckpointError: a bad config, an unpaired or misshapen lora_A/lora_B, a rank that is not the
            config's, or neither a LoRA layer nor a module_to_save.
    """
    from tbdiag.io.checkpoint import open_file

    config = read_config(folder)
    weights = next(folder / w for w in ADAPTER_WEIGHTS if (folder / w).is_file())
    parts: dict[tuple[str, bool], dict[str, TensorRef]] = {}
    rest, layers, other = [], [], []
    for ref in open_file(weights).tensors:
        found = LORA_KEY.match(ref.name)
        if found is None:
            rest.append(ref)
            continue
        embedding = found["embedding"] is not None
        parts.setdefault((found["module"], embedding), {})[found["embedding"] or found["part"]] = ref
    for (module, embedding), pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{weights}: {module} has lora_{''.join(pair)} without its partner; re-save the adapter")
        a, b = pair["A"], pair["B"]
        if not (2 <= len(a.shape) <= (2 if embedding else 5) and len(b.shape) == len(a.shape)
                and all(k == 1 for k in b.shape[2:])):
            other.append(module)  # not a linear, embedding or convolution LoRA pair
            continue
        layers.append(_layer(module, a, b, config, weights, embedding))
    saved, more = _full_weights(rest, config)
    if not layers and not saved:
        raise CheckpointError(f"{weights}: no LoRA layer found; pass a PEFT LoRA adapter folder")
    return Adapter(str(folder), config, tuple(layers), tuple(saved), tuple(other + more))


def _full_weights(refs: list[TensorRef], config: dict) -> tuple[list[TensorRef], list[str]]:
    """The matrices of ``modules_to_save`` (PEFT's rule: the module name ends with an entry), named as the
    base model names them; and the names of the other matrices (biases and norms are no layers)."""
    saved, other = [], []
    for ref in refs:
        if not ref.dtype.is_floating_point or len(ref.shape) < 2:
            continue
        name = ref.name.removeprefix(PREFIX)
        if any(layer_name(name).endswith(entry) for entry in config["modules_to_save"]):
            saved.append(dataclasses.replace(ref, name=name))
        else:
            other.append(layer_name(name))
    return saved, other


def _layer(module: str, a: TensorRef, b: TensorRef, config: dict, where: Path, embedding: bool) -> AdapterLayer:
    rank = a.shape[0]
    if b.shape[1] != rank:
        raise CheckpointError(f"{where}: {module}: lora_B is {list(b.shape)}, lora_A {list(a.shape)}: their ranks "
                              "differ; re-save the adapter")
    r = pattern_value(config["rank_pattern"], module, config["r"])
    if r != rank:
        raise CheckpointError(f"{where}: {module} has rank {rank} but the config says {r}; pass the config saved "
                              "with these weights")
    alpha = pattern_value(config["alpha_pattern"], module, config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    transposed = embedding or (bool(config.get("fan_in_fan_out")) and len(a.shape) == 2)
    return AdapterLayer(module, a, b, rank, scale, transposed, embedding)


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


def adapter_specs(adapter: Adapter, base: list[LayerSpec] | None, *, merge: bool | None = None,
                  include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> tuple[list[LayerSpec], dict[str, int]]:
    """Specs of the adapted layers: ΔW (low rank), or W + ΔW when ``merge`` (the default when the ``base``
    model's layers are given, embeddings included), and then the weights of ``modules_to_save`` (merged only;
    module docstring). Every adapted layer is checked against ``base`` when it is given, merged or not.

    Raises:
        TbdiagError: an adapted layer missing from the base, or of another shape there; ``merge`` without a base.
    """
    merge = base is not None if merge is None else merge
    if merge and base is None:
        raise TbdiagError(f"{adapter.source}: merging the adapter needs the base model's weights")
    base_specs = None if base is None else {s.name: s for s in base}
    specs: list[LayerSpec] = []
    skipped = {"excluded": 0, "adapter_other": len(adapter.other), "modules_to_save": 0}
    for layer in adapter.layers:
        weight = None if base_specs is None else _base_layer(adapter.source, layer, _base_ref(layer, base_specs))
        if not selected(layer.name, include, exclude):
            skipped["excluded"] += 1
        elif merge:
            ref = dataclasses.replace(weight, load=_merged(weight, layer), load_rows=None)
            specs.append(LayerSpec(layer.name, layer.kind, layer.shape, ref, layer.name))
        else:
            ref = TensorRef(layer.name, layer.shape, torch.float64, load=layer.delta)
            specs.append(LowRankSpec(layer.name, layer.kind, layer.shape, ref, layer.name, layer=layer))
    saved, saved_skipped = plan_layers(Checkpoint(adapter.source, LORA_FORMAT, adapter.saved), include=include,
                                       exclude=exclude, include_embeddings=True)
    skipped["excluded"] += saved_skipped["excluded"]
    if merge:
        specs += saved
    elif saved:
        skipped["modules_to_save"] = len(saved)
        log.warning("%s: left out modules_to_save %s: full weights, no update (the merged view, with the base model, "
                    "analyses them)", adapter.source, _names([s.name for s in saved]))
    copies = [n for n in adapter.other if n.endswith(".base_layer")]  # PEFT saves them beside adapted embeddings
    for level, names in ((logging.INFO, copies), (logging.WARNING, [n for n in adapter.other if n not in copies])):
        if names:
            log.log(level, "%s: left out %s: neither LoRA factors nor modules_to_save", adapter.source, _names(names))
    return specs, skipped


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f", … (+{len(names) - 3})" if len(names) > 3 else "")


def _base_ref(layer: AdapterLayer, base: dict[str, LayerSpec]) -> TensorRef | None:
    """The base weight of an adapted layer by name; for an output head the base file does not hold (tied to
    the input embedding, saved once), the one base embedding matrix of its shape."""
    if layer.name in base:
        return base[layer.name].ref
    tied = [s for s in base.values() if s.kind == "embedding" and tuple(s.ref.shape) == layer.shape]
    if len(tied) == 1:
        log.info("%s: not in the base; taken as tied to %s (same shape, saved once)", layer.name, tied[0].name)
        return tied[0].ref
    return None


def _base_layer(source: str, layer: AdapterLayer, base: TensorRef | None) -> TensorRef:
    """The base model's weight of an adapted layer, checked to be there and of the layer's shape."""
    if base is None:
        raise TbdiagError(f"{source}: adapted layer {layer.name} is not a layer of the base model; pass the "
                          "base model the adapter was trained on")
    if tuple(base.shape) != layer.shape:
        raise TbdiagError(f"{source}: {layer.name} is {list(layer.shape)} in the adapter but {list(base.shape)} in "
                          "the base model; pass the base model the adapter was trained on")
    return base


def _merged(base: TensorRef, layer: AdapterLayer) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        w = base.load()
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        return w.to(dtype) + layer.delta(dtype)
    return load
