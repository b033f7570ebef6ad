"""`tbdiag prune` at its edges, each checked by the numbers the written file holds: stacked MoE experts pruned
per expert, zeros already in a layer, tied PyTorch tensors, layers without a finite alpha, empty paths,
the same sparsities as `recommend --target sparsity`, block sizes and names (prefixes, shortcuts, experts)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import tbdiag
from tbdiag.errors import TbdiagError
from tbdiag.pruning.core import prune
from tbdiag.io.st_reader import read_header
from tbdiag.allocation.allocators import sparsity as allocated
from tests.test_prune import cli, fixed_alphas, llama_state, mlp_state, saved, zeros

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# --- stacked experts: one sparsity per expert, realised on its own slice --------------------------------------


def moe_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two blocks of a q projection and a stack of 4 experts (4 × 64 × 128); expert 2 of block 0 is tiny."""
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(96, 64, generator=g)}
    for b in range(2):
        state[f"model.layers.{b}.self_attn.q_proj.weight"] = torch.randn(64, 64, generator=g)
        experts = torch.randn(4, 64, 128, generator=g)
        if b == 0:
            experts[2] *= 1e-3
        state[f"model.layers.{b}.mlp.experts.down_proj"] = experts
    state["lm_head.weight"] = torch.randn(96, 64, generator=g)
    return state


def test_each_expert_has_its_own_alpha_sparsity_and_exact_zeros(tmp_path, monkeypatch):
    state = moe_state()
    path = saved(tmp_path, state)
    stack = "model.layers.{}.mlp.experts.down_proj"
    alphas = {f"model.layers.{b}.self_attn.q_proj": 2.0 + b for b in range(2)}
    alphas.update({f"{stack.format(b)}.{e}": 2.0 + 0.5 * e + b for b in range(2) for e in range(4)})
    fixed_alphas(monkeypatch, alphas)
    out = tmp_path / "out.safetensors"
    res = prune(path, out, sparsity=0.5, allocation_json=tmp_path / "a.json")
    names = list(alphas)
    expected = dict(zip(names, allocated([alphas[n] for n in names], [4096 if "q_proj" in n else 8192 for n in names],
                                         0.5, 0.3)))
    got = {x.name: x for x in res.layers}
    assert set(got) == set(names) and len(res.layers) == 10
    assert {n: got[n].sparsity for n in names} == pytest.approx(expected, rel=1e-12)
    assert [got[f"{stack.format(0)}.{e}"].expert for e in range(4)] == [0, 1, 2, 3]
    written = file_tensors(out)
    for b in range(2):
        for e in range(4):
            x = got[f"{stack.format(b)}.{e}"]
            before, after = state[stack.format(b)][e], written[stack.format(b)][e]
            assert x.n_params == 8192 and x.n_pruned == zeros(after) == round(expected[x.name] * 8192)
            kept = after != 0
            assert torch.equal(after[kept], before[kept]) and before[~kept].abs().max() <= before[kept].abs().min()
    tiny = written[stack.format(0)][2]
    assert int((tiny != 0).sum()) == 8192 - got[f"{stack.format(0)}.2"].n_pruned > 3000  # not wiped out
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["layers"][f"{stack.format(1)}.3"]["layers"] == [f"{stack.format(1)}.3"]
    assert doc["layers"][f"{stack.format(1)}.3"]["sparsity"] == pytest.approx(expected[f"{stack.format(1)}.3"])
    assert doc["n_pruned"] == sum(zeros(written[x.tensor] if x.expert is None else written[x.tensor][x.expert])
                                  for x in res.layers)


def test_experts_in_a_block_share_its_sparsity_each_on_its_own_slice_with_analyze_alphas(tmp_path):
    state = moe_state(1)
    path = saved(tmp_path, state)
    res = prune(path, tmp_path / "out.safetensors", sparsity=0.6, unit="block")
    fitted = {r.name: r.alpha for r in tbdiag.analyze(path, fit="peak").layers}
    assert {x.name: x.alpha for x in res.layers} == {n: fitted[n] for n in fitted if "layers" in n}
    written = file_tensors(tmp_path / "out.safetensors")
    for x in res.layers:
        block = [y for y in res.layers if y.unit == x.unit]
        assert x.unit_alpha == pytest.approx(sum(y.alpha for y in block) / len(block))
        part = written[x.tensor] if x.expert is None else written[x.tensor][x.expert]
        assert zeros(part) == x.n_pruned == round(x.sparsity * x.n_params)


# --- zeros already in a layer: counted, and pruned only up to the target --------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "plan"])
def test_zeros_already_there_count_and_are_never_added_beyond_the_target(tmp_path, fmt):
    state = mlp_state()
    state["fc1.weight"].view(-1)[: round(0.3 * 6144)] = 0  # 30 % zeros: pruned further to 50 %
    state["fc2.weight"].view(-1)[: round(0.7 * 6144)] = 0  # 70 % zeros: left as it is
    if fmt == "pt":
        path = tmp_path / "ckpt.pt"
        torch.save(state, path)
    else:
        path = saved(tmp_path, state)
    out = None if fmt == "plan" else tmp_path / "out.safetensors"
    res = prune(path, out, sparsity=0.5, allocation="uniform", allocation_json=tmp_path / "a.json")
    got = {x.name: x for x in res.layers}
    assert [(got[n].n_zero_input, got[n].n_pruned) for n in ("fc1", "fc2", "fc3")] == [(1843, 3072), (4301, 4301),
                                                                                       (0, 4096)]
    assert got["fc2"].realised == 4301 / 6144 and res.n_pruned == 3072 + 4301 + 4096
    assert res.realised_mean == res.n_pruned / res.n_params
    doc = json.loads((tmp_path / "a.json").read_text())
    assert (doc["n_pruned"], doc["n_zero_input"], doc["layers"]["fc2"]["n_pruned"]) == (11469, 6144, 4301)
    if fmt == "plan":
        shown = cli(path, "--sparsity", "0.5", "--allocation", "uniform", "--plan-only")
        assert "11,469 of 20,480 weights are zero (6,144 were already)" in shown.stdout, shown.stdout
    if out is not None:
        written = file_tensors(out)
        assert {n: zeros(written[f"{n}.weight"]) for n in got} == {n: x.n_pruned for n, x in got.items()}
        assert torch.equal(written["fc2.weight"], state["fc2.weight"])  # more zeros than the target: untouched
        kept = written["fc1.weight"] != 0
        assert torch.equal(written["fc1.weight"][kept], state["fc1.weight"][kept])


# --- tied tensors of a PyTorch state dict --------------------------------------------------------------------


class TiedLM(nn.Module):
    """GPT-2's tying: the LM head is the token embedding; ``tie_blocks`` also ties two pruned layers."""

    def __init__(self, tie_blocks: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(96, 64)
        self.transformer.h = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(64, 64), "proj": nn.Linear(64, 64)})
                                           for _ in range(2))
        self.lm_head = nn.Linear(64, 96, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        if tie_blocks:
            self.transformer.h[1]["fc"].weight = self.transformer.h[0]["fc"].weight


@pytest.mark.parametrize("tie_blocks", [False, True])
def test_tied_tensors_are_all_written_and_load_back_strictly(tmp_path, tie_blocks):
    model = TiedLM(tie_blocks)
    state = model.state_dict()
    folder = tmp_path / "model"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    res = prune(folder / "pytorch_model.bin", tmp_path / "out.safetensors", sparsity=0.5, allocation="uniform")
    prune(folder, tmp_path / "pruned", sparsity=0.5, allocation="uniform")  # a folder: the same file inside
    for out in (tmp_path / "out.safetensors", tmp_path / "pruned" / "model.safetensors"):
        written = load_file(out)
        assert json.loads(read_header(out)[1]["tbdiag_order"]) == list(state)
        fresh = TiedLM(tie_blocks)
        fresh.load_state_dict(written, strict=True)
        assert torch.equal(written["lm_head.weight"], state["transformer.wte.weight"])  # not pruned, as the input
        assert torch.equal(written["transformer.wte.weight"], state["transformer.wte.weight"])
        pruned = {x.tensor: x.n_pruned for x in res.layers}
        assert {t: zeros(written[t]) for t in pruned} == pruned and set(pruned.values()) == {2048}
        tied = written["transformer.h.1.fc.weight"]
        assert zeros(tied) == 2048
        if tie_blocks:  # not a layer of its own: a copy of the pruned first name, pruned the same way
            assert torch.equal(tied, written["transformer.h.0.fc.weight"])
            assert "transformer.h.1.fc.weight" not in pruned and len(pruned) == 3
        else:
            assert not torch.equal(tied, written["transformer.h.0.fc.weight"]) and len(pruned) == 4


# --- layers whose alpha is not finite: named, with the sparsity they got ------------------------------------


def fallback_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    state = {f"fc{i}.weight": torch.randn(m, n, generator=g)
             for i, (m, n) in enumerate([(64, 64), (96, 64), (64, 96), (128, 64), (64, 128), (10, 64)])}
    state["fc2.weight"].zero_()
    state["fc3.weight"] = torch.outer(torch.randn(128, generator=g), torch.randn(64, generator=g))  # rank 1
    return state


def test_layers_without_a_finite_alpha_are_named_with_their_sparsity(tmp_path, caplog):
    path = saved(tmp_path, fallback_state())
    with caplog.at_level(logging.WARNING, logger="tbdiag.pruning.core"):
        res = prune(path, tmp_path / "out.safetensors", sparsity=0.5, allocation_json=tmp_path / "a.json")
    got = {x.name: x for x in res.layers}
    assert [(x.name, x.status) for x in res.fallbacks] == [("fc2", "zero_matrix"), ("fc3", "degenerate")]
    assert math.isfinite(got["fc1"].alpha) and math.isfinite(got["fc4"].alpha) and got["fc1"].status == "ok"
    low, high = sorted(("fc1", "fc4"), key=lambda n: got[n].alpha)
    ratio = {low: 0.7, high: 1.3, "fc2": 1.0, "fc3": 1.0}  # no alpha: the middle ratio
    sizes = {n: got[n].n_params for n in ratio}
    c = 0.5 * sum(sizes.values()) / sum(sizes[n] * ratio[n] for n in ratio)
    assert {n: got[n].sparsity for n in ratio} == pytest.approx({n: c * r for n, r in ratio.items()}, rel=1e-12)
    assert got["fc2"].n_pruned == got["fc2"].n_zero_input == 6144  # a zero matrix stays all zeros
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["fallbacks"] == [{"layer": "fc2", "status": "zero_matrix", "sparsity": pytest.approx(c),
                                 "from": "ratio 1, the middle of the range"},
                                {"layer": "fc3", "status": "degenerate", "sparsity": pytest.approx(c),
                                 "from": "ratio 1, the middle of the range"}]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"fc2 (zero_matrix): sparsity {c:.4f}" in warned[0] and "fc3 (degenerate)" in warned[0]
    shown = cli(path, "--sparsity", "0.5", "--plan-only")
    assert shown.exit_code == 0 and (f"alpha not finite for 2 layers: fc2 (zero_matrix): sparsity {c:.4f} from ratio "
                                     f"1, the middle of the range; fc3 (degenerate)") in shown.stdout
    assert prune(path, sparsity=0.5, allocation="uniform").fallbacks == ()  # no alpha asked, none missing


def test_a_layer_without_alpha_in_a_block_takes_the_blocks_mean(tmp_path):
    state = llama_state()
    state["model.layers.1.mlp.up_proj.weight"].zero_()
    res = prune(saved(tmp_path, state), sparsity=0.5, unit="block")
    (x,) = res.fallbacks
    block = [y for y in res.layers if y.unit == "model.layers.1" and y is not x]
    assert x.name == "model.layers.1.mlp.up_proj" and x.fallback == "its block's mean alpha"
    assert x.unit_alpha == pytest.approx(sum(y.alpha for y in block) / len(block)) and len(block) == 4
    assert {y.sparsity for y in block} == {x.sparsity}


# --- empty paths ----------------------------------------------------------------------------------------------


def test_empty_paths_are_refused_before_anything_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved(tmp_path, mlp_state(), "model.safetensors")  # what "" would read: the working folder
    for kwargs, message in (({"source": "", "allocation_json": "a.json"}, "source path is empty; name a checkpoint"),
                            ({"out": ""}, "out path is empty; name a new file or folder"),
                            ({"out": " "}, "out path is empty"),
                            ({"allocation_json": ""}, "allocation_json path is empty; name a .json file")):
        with pytest.raises(TbdiagError, match=message) as caught:
            prune(**{"source": "model.safetensors", **kwargs}, sparsity=0.5, allocation="uniform")
        assert "--" not in str(caught.value)
    for args, line in ((["", "--plan-only"], "error: PATH is empty; name a checkpoint file or folder"),
                       (["model.safetensors", "--out", ""], "error: --out is empty; name a new file or folder"),
                       (["model.safetensors", "--allocation-json", ""], "error: --allocation-json is empty")):
        res = cli(*args, "--sparsity", "0.5")
        assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1 and res.stderr.startswith(line), res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


# --- recommend --target sparsity sells what prune applies -----------------------------------------------------


@pytest.mark.parametrize("sample, recommend_flags, prune_flags", [
    ("mlp_sharded", ["--include-first-last", "--min-evals", "10"], ["--include-first-last", "--min-evals", "10"]),
    ("cnn_trained.safetensors", [], []),
    ("moe", ["--include-first-last", "--min-evals", "10"], ["--include-first-last", "--min-evals", "10"]),
])
def test_recommend_sparsity_and_prune_agree_by_default(tmp_path, sample, recommend_flags, prune_flags):
    from tests.test_allocate import run

    source = SAMPLES / sample if sample != "moe" else tmp_path / "moe.safetensors"
    if sample == "moe":  # stacked experts: one unit each, in both
        save_file(moe_state(), source)
    assert run("recommend", source, "--target", "sparsity", "--sparsity", "0.6", *recommend_flags,
               "-o", tmp_path / "r.json").exit_code == 0
    assert cli(source, "--sparsity", "0.6", *prune_flags, "--allocation-json", tmp_path / "p.json").exit_code == 0
    sold, applied = (json.loads((tmp_path / f).read_text()) for f in ("r.json", "p.json"))
    assert sold["fit"] == applied["fit"] == "peak" and list(sold["layers"]) == list(applied["layers"])
    for unit, entry in sold["layers"].items():
        assert entry["sparsity"] == pytest.approx(applied["layers"][unit]["sparsity"], abs=1e-12), unit
        assert entry["alpha"] == pytest.approx(applied["layers"][unit]["alpha"], abs=1e-12), unit
    spread = [e["sparsity"] for e in sold["layers"].values()]
    assert max(spread) - min(spread) > 0.1  # alphas that differ: the fit decides the numbers


# --- blocks and names -----------------------------------------------------------------------------------------


def test_a_blocks_size_is_the_sum_of_its_layers(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    shapes = {0: [("q", (64, 64)), ("up", (128, 64))], 1: [("q", (64, 64))],
              2: [("up", (128, 64)), ("down", (64, 128)), ("q", (64, 64))]}
    state = {f"h.{b}.{n}.weight": torch.randn(*s, generator=g) for b, parts in shapes.items() for n, s in parts}
    fixed_alphas(monkeypatch, {f"h.{b}.{n}": 2.0 + b for b, parts in shapes.items() for n, _ in parts})
    path = saved(tmp_path, state)
    res = prune(path, tmp_path / "out.safetensors", sparsity=0.5, unit="block")
    # blocks of 12288, 4096 and 20480 weights, ratios 0.7, 1.0, 1.3: c = 0.5·36864 / (8601.6 + 4096 + 26624)
    c = 0.5 * 36864 / (12288 * 0.7 + 4096 * 1.0 + 20480 * 1.3)
    blocks = {x.unit: x.sparsity for x in res.layers}
    assert blocks == pytest.approx({"h.0": 0.7 * c, "h.1": c, "h.2": 1.3 * c}, rel=1e-12)
    written = file_tensors(tmp_path / "out.safetensors")
    by_hand = sum(round(blocks[f"h.{b}"] * s[0] * s[1]) for b, parts in shapes.items() for _, s in parts)
    assert sum(zeros(t) for t in written.values()) == res.n_pruned == by_hand


@pytest.mark.parametrize("prefix", ["module.", "module._orig_mod.", "model."])
def test_prefixed_names_are_pruned_in_the_file(tmp_path, prefix):
    state = mlp_state()
    path = saved(tmp_path, {prefix + k: v for k, v in state.items()})
    res = prune(path, tmp_path / "out.safetensors", sparsity=0.5)
    written = file_tensors(tmp_path / "out.safetensors")
    assert set(written) == {prefix + k for k in state}  # the input's names, as they were
    clean = "model." if prefix == "model." else ""
    assert [x.tensor for x in res.layers] == [f"{clean}fc{i}.weight" for i in (1, 2, 3)]
    counted = {x.tensor: zeros(written[prefix + x.tensor.removeprefix(clean)]) for x in res.layers}
    assert counted == {x.tensor: x.n_pruned for x in res.layers} and min(counted.values()) > 1000


def resnet_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    conv = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bn = lambda p: {f"{p}.weight": torch.ones(64), f"{p}.bias": torch.zeros(64), f"{p}.running_mean": torch.zeros(64),
                    f"{p}.running_var": torch.ones(64), f"{p}.num_batches_tracked": torch.tensor(3)}  # noqa: E731
    state = {"conv1.weight": conv(64, 3, 7, 7), **bn("bn1")}
    for b in range(2):
        for i in (1, 2):
            state.update({f"layer1.{b}.conv{i}.weight": conv(64, 64, 3, 3), **bn(f"layer1.{b}.bn{i}")})
        if b == 0:
            state.update({"layer1.0.downsample.0.weight": conv(64, 64, 1, 1), **bn("layer1.0.downsample.1")})
    state["fc.weight"] = conv(10, 64)
    return state


def test_a_resnet_shortcut_and_per_expert_modules_stay_in_their_block(tmp_path, monkeypatch):
    state = resnet_state()
    fixed_alphas(monkeypatch, {"layer1.0.conv1": 2.0, "layer1.0.conv2": 3.0, "layer1.0.downsample.0": 4.0,
                               "layer1.1.conv1": 4.0, "layer1.1.conv2": 6.0})
    out = tmp_path / "out.safetensors"
    res = prune(saved(tmp_path, state), out, sparsity=0.5, unit="block")
    units = {x.name: x.unit for x in res.layers}
    assert units == {"layer1.0.conv1": "layer1.0", "layer1.0.conv2": "layer1.0", "layer1.0.downsample.0": "layer1.0",
                     "layer1.1.conv1": "layer1.1", "layer1.1.conv2": "layer1.1"}
    expected = allocated([3.0, 5.0], [2 * 36864 + 4096, 2 * 36864], 0.5)
    assert {x.unit: x.sparsity for x in res.layers} == pytest.approx(dict(zip(["layer1.0", "layer1.1"], expected)))
    written = file_tensors(out)
    assert zeros(written["layer1.0.downsample.0.weight"]) == round(expected[0] * 4096)
    assert all(torch.equal(written[k], v) for k, v in state.items() if "bn" in k or "downsample.1" in k)
    g = torch.Generator().manual_seed(1)
    mixtral = {f"model.layers.{b}.block_sparse_moe.experts.{e}.w1.weight": torch.randn(128, 64, generator=g)
               for b in range(2) for e in range(3)}
    res = prune(saved(tmp_path, mixtral, "moe.safetensors"), sparsity=0.5, unit="block", allocation="uniform")
    assert {x.unit for x in res.layers} == {"model.layers.0", "model.layers.1"}


def test_a_low_eigenvalue_minimum_fits_the_layers_it_selects(tmp_path):
    """--min-evals 8 selects 8-eigenvalue layers: recommend and prune fit them (analyze's own minimum is 10)."""
    from tests.test_allocate import run

    torch.manual_seed(0)
    path = tmp_path / "small.safetensors"
    save_file({f"layers.{i}.fc.weight": torch.randn(8, 64) * (1 + i) ** 2 for i in range(4)}, path)
    res = run("recommend", path, "--min-evals", "8", "--include-first-last", "--out", "-")
    assert res.exit_code == 0, res.output
    mult = [g["multiplier"] for g in json.loads(res.stdout)["layers"].values()]
    assert len(mult) == 4 and max(mult) - min(mult) > 0.5  # fitted alphas spread the multipliers
    assert cli(path, "--sparsity", "0.5", "--min-evals", "8", "--include-first-last",
               "--allocation-json", tmp_path / "a.json").exit_code == 0
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["fallbacks"] == [] and all(e["alpha"] is not None for e in doc["layers"].values())


def test_an_adapters_weights_file_is_no_model_to_prune(tmp_path):
    """The adapter rule holds for its adapter_model.* file too: its lora_A/lora_B factors are not layers."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    g = torch.Generator().manual_seed(0)
    save_file({"base_model.model.fc.lora_A.weight": torch.randn(4, 64, generator=g),
               "base_model.model.fc.lora_B.weight": torch.randn(64, 4, generator=g)}, folder / "adapter_model.safetensors")
    for source in (folder, folder / "adapter_model.safetensors"):
        res = cli(source, "--sparsity", "0.5", "--min-evals", "2", "--include-first-last", "--out", tmp_path / "x.safetensors")
        assert res.exit_code == 2 and "a PEFT adapter, not a model checkpoint" in res.stderr, res.output
    assert not (tmp_path / "x.safetensors").exists()
