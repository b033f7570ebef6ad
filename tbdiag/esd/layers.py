"""Which tensors of a checkpoint are layers, what kind they are, and how to see them as matrices.

A live module decides the kind by type; a file decides it from the tensor's name and shape:
2-D weights are Linear (or Embedding, by name), 3-D Conv1d, 4-D Conv2d, 5-D Conv3d, and
``weight_ih_l*``/``weight_hh_l*`` recurrent gate matrices. Norms, biases, 1-D/scalar and integer
tensors are not layers.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from tbdiag.io.tensors import Checkpoint, TensorRef, numel
from tbdiag.errors import TbdiagError

CONV_KINDS = {3: "conv1d", 4: "conv2d", 5: "conv3d"}
EMBEDDING_PARTS = {"wte", "wpe", "shared"}
EMBEDDING_PART = re.compile(r"(^|_)emb|embed")  # embed_tokens, word_embeddings, tok_emb, pos_emb
KIND_NDIM = {"linear": 2, "embedding": 2, "rnn": 2, "conv1d": 3, "conv2d": 4, "conv3d": 5, "moe": 3}
FUSED_QKV = re.compile(r"(^|[._])(qkv|qkv_proj|c_attn|query_key_value|wqkv|in_proj)($|[._])", re.IGNORECASE)
FP8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)}
RNN_WEIGHT = re.compile(r"^weight_(ih|hh)_l\d+(_reverse)?$")
NOT_A_MATRIX = ("weight_scale", "weight_scale_inv", "weight_g")  # quantisation scales, weight-norm gain


def is_transposed_linear(mod: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored in × out (``x @ W + b``).

    Recognised by its class name and its ``nf`` (output features) attribute, without importing transformers.
    """
    weight = getattr(mod, "weight", None)
    return (type(mod).__name__ == "Conv1D" and isinstance(getattr(mod, "nf", None), int)
            and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == mod.nf)


def kind_of_module(mod: nn.Module) -> str | None:
    """Layer kind of a module's ``weight`` by its type, or None for modules whose weight is no layer."""
    if is_transposed_linear(mod):
        return "linear"
    if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if isinstance(mod, (nn.Conv1d, nn.ConvTranspose1d)):
        return "conv1d"
    if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
        return "conv2d"
    if isinstance(mod, (nn.Conv3d, nn.ConvTranspose3d)):
        return "conv3d"
    if isinstance(mod, nn.RNNBase):
        return "rnn"
    if isinstance(mod, (nn.Linear, nn.Bilinear, nn.MultiheadAttention)):
        return "linear"
    return None


def layer_name(tensor_name: str) -> str:
    """Layer name of a weight tensor: its name without a trailing ``.weight``."""
    return tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else tensor_name


def kind_from_name(name: str, shape: tuple[int, ...]) -> str | None:
    """Guess a weight tensor's layer kind from its name and shape (no module at hand)."""
    last = name.rsplit(".", 1)[-1]
    if len(shape) == 3 and "expert" in name.lower() and last not in NOT_A_MATRIX:
        return "moe"  # a stack of expert matrices (E, out, in), with or without a .weight suffix
    if last in NOT_A_MATRIX or not (last == "weight" or last.startswith("weight_") or last.endswith("_weight")):
        return None
    if RNN_WEIGHT.match(last) and len(shape) == 2:
        return "rnn"
    if len(shape) == 2:
        parts = name.lower().split(".")[:-1]
        is_embedding = any(EMBEDDING_PART.search(p) or p in EMBEDDING_PARTS for p in parts)
        return "embedding" if is_embedding else "linear"
    return CONV_KINDS.get(len(shape))


@dataclass(frozen=True)
class LayerSpec:
    """A layer planned for analysis: known from the header alone, before any data is read."""

    name: str
    kind: str
    shape: tuple[int, ...]
    ref: TensorRef = field(repr=False, compare=False)
    tensor: str = ""  # the checkpoint tensor it comes from (parts of a fused or stacked tensor share it)

    @property
    def n_matrices(self) -> int:
        """Number of matrices the weight is sliced into (kernel positions for convolutions)."""
        k = 1
        for s in self.shape[2:]:
            k *= s
        return k

    @property
    def n_evals(self) -> int:
        """Number of eigenvalues of the pooled ESD."""
        return self.n_matrices * min(self.shape[0], self.shape[1])

    @property
    def cost(self) -> float:
        """Relative eigensolver cost, proportional to k·m·n·min(m, n)."""
        m, n = self.shape[0], self.shape[1]
        return float(self.n_matrices) * m * n * min(m, n)


def selected(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """Whether a layer name passes the glob filters (``include``: any of them, when given; ``exclude``: none)."""
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def plan_layers(checkpoint: Checkpoint, *, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                include_embeddings: bool = False, split_qkv: bool = False) -> tuple[list[LayerSpec], dict[str, int]]:
    """Pick the layers of a checkpoint, in checkpoint order.

    Args:
        checkpoint: the opened checkpoint.
        include: glob patterns on layer names; when given, only matching layers are kept.
        exclude: glob patterns on layer names to drop.
        include_embeddings: analyse embedding matrices too.
        split_qkv: analyse fused query/key/value matrices as three equal parts ``name.q/.k/.v``.

    Mixture-of-experts stacks ``(E, out, in)`` become one layer per expert (``name.0`` …); FP8 weights are
    dequantised with their ``weight_scale_inv`` (block) or ``weight_scale`` companion (see `dequantized`).

    Returns:
        The layers, and counts of what was left out (``embedding``, ``excluded``).

    Raises:
        TbdiagError: an FP8 layer without a scale companion, or with a scale whose layout is unknown.
    """
    layers, skipped = [], {"embedding": 0, "excluded": 0}
    by_name = {t.name: t for t in checkpoint.tensors}
    for ref in checkpoint.tensors:
        if not ref.dtype.is_floating_point or len(ref.shape) < 2 or min(ref.shape) == 0:
            continue
        kind = ref.kind_hint or kind_from_name(ref.name, ref.shape)
        if kind is None:
            continue
        if len(ref.shape) != KIND_NDIM[kind]:
            continue  # e.g. a Bilinear's 3-D weight: no matrix view we know of
        name = layer_name(ref.name)
        if kind == "embedding" and not include_embeddings:
            skipped["embedding"] += 1
            continue
        if not selected(name, include, exclude):
            skipped["excluded"] += 1
            continue
        if ref.dtype in FP8:  # only layers that will be analysed need (and must have) their scale
            ref = dequantized(ref, by_name, checkpoint.source)
        layers.extend(_expand(LayerSpec(name, kind, ref.shape, ref, ref.name), split_qkv))
    return layers, skipped


def _expand(spec: LayerSpec, split_qkv: bool) -> list[LayerSpec]:
    """One spec per expert of a MoE stack, or per part of a fused QKV matrix (on request)."""
    ref = spec.ref
    if spec.kind == "moe":
        return [LayerSpec(f"{spec.name}.{e}", "linear", ref.shape[1:],
                          TensorRef(f"{ref.name}.{e}", ref.shape[1:], ref.dtype, load=lambda e=e: ref.load_slice(e, e + 1)[0]),
                          spec.tensor)
                for e in range(ref.shape[0])]
    if not (split_qkv and spec.kind == "linear" and FUSED_QKV.search(spec.name.rsplit(".", 1)[-1])):
        return [spec]
    axis = fused_axis(ref.shape, ref.transposed)
    if axis is None:
        return [spec]
    m, n = ref.shape
    if axis == 0:  # (3·d, in): rows
        part, shape = m // 3, (m // 3, n)
        loads = [lambda i=i: ref.load_slice(i * part, (i + 1) * part) for i in range(3)]
    else:  # GPT-2's Conv1D stores (in, 3·d): columns
        part, shape = n // 3, (m, n // 3)
        loads = [lambda i=i: ref.load()[:, i * part:(i + 1) * part] for i in range(3)]
    return [LayerSpec(f"{spec.name}.{p}", "linear", shape, TensorRef(f"{ref.name}.{p}", shape, ref.dtype, load=load),
                      spec.tensor)
            for p, load in zip("qkv", loads)]


def fused_axis(shape: tuple[int, ...], transposed: bool) -> int | None:
    """The axis of a fused q/k/v weight that stacks the three parts, or None when it cannot be split evenly.

    The output features hold the parts: dim 0 of a torch ``(out, in)`` weight, dim 1 of a ``Conv1D`` weight
    stored ``(in, out)``. A file does not say which layout it has; a dimension exactly three times the other
    is the fused one (GPT-2's ``c_attn`` is 768 × 2304), otherwise the torch layout is assumed.
    """
    m, n = shape
    if transposed:
        return 1 if n % 3 == 0 else None
    if n == 3 * m:
        return 1
    if m % 3 == 0:
        return 0
    return 1 if n % 3 == 0 else None


def dequantized(ref: TensorRef, by_name: dict[str, TensorRef], where: str) -> TensorRef:
    """An FP8 weight as float32, multiplied by its scale companion.

    ``<name>_scale_inv`` of a 2-D weight is a grid of square blocks (DeepSeek-V3: 128×128). ``<name>_scale`` is
    one number; or one per row (output channel; expert of a stack): shape ``(d0,)`` or ``(d0, 1, …)``; or one
    per column of a 2-D weight: ``(1, n)``, or ``(n,)`` when n differs from the row count (a 1-D scale of a
    square weight is per row); or any shape of the weight's rank that broadcasts to it.

    Raises:
        TbdiagError: no companion (the raw FP8 values would give wrong numbers), or one of another layout.
    """
    block_scale, plain_scale = by_name.get(f"{ref.name}_scale_inv"), by_name.get(f"{ref.name}_scale")
    shape = ref.shape
    dims = "×".join(map(str, shape))
    unknown = "this FP8 layout is unknown: dequantise the checkpoint first, or exclude the layer"
    if block_scale is None and plain_scale is None:
        raise TbdiagError(f"{where}: {ref.name} is {ref.dtype} without a {ref.name}_scale_inv or {ref.name}_scale "
                          f"companion; {unknown}")
    if block_scale is not None:
        sm, sn = block_scale.shape if len(block_scale.shape) == 2 and len(shape) == 2 else (0, 0)
        bs = -(-shape[0] // sm) if sm else 0
        if not sm or -(-shape[1] // bs) != sn:
            raise TbdiagError(f"{where}: {ref.name}_scale_inv has shape {list(block_scale.shape)}, not a block grid "
                              f"of a {dims} weight; {unknown}")
        m, n = shape

        def load() -> torch.Tensor:
            s = block_scale.load().float().repeat_interleave(bs, 0)[:m].repeat_interleave(bs, 1)[:, :n]  # (m, n)
            return ref.load().float() * s
    else:
        view = _scale_view(shape, plain_scale.shape)
        if view is None:
            raise TbdiagError(f"{where}: {ref.name}_scale has shape {list(plain_scale.shape)}: not one number, one "
                              f"per row or one per column of a {dims} weight; {unknown}")

        def load() -> torch.Tensor:
            return ref.load().float() * plain_scale.load().float().reshape(view)
    return dataclasses.replace(ref, dtype=torch.float32, load=load, load_rows=None)


def _scale_view(shape: tuple[int, ...], scale: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape that broadcasts a ``weight_scale`` of shape ``scale`` against the weight, or None."""
    k = numel(scale)
    if k == 1:
        return ()
    if len(scale) == 1 and k == shape[0]:
        return (k,) + (1,) * (len(shape) - 1)
    if len(scale) == 1 and len(shape) == 2 and k == shape[1]:
        return (1, k)
    if len(scale) == len(shape) and all(s in (1, d) for s, d in zip(scale, shape)):
        return tuple(scale)
    return None


def as_matrices(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """View a weight as a stack of matrices: ``(k, out, in)``, one per kernel position for convolutions."""
    if kind in CONV_KINDS.values():
        return weight.flatten(2).permute(2, 0, 1)  # (out, in, *kernel) -> (k, out, in)
    return weight.unsqueeze(0)  # (1, out, in)
