"""Tests written against surviving mutants of benchmarks/mutation.sh (pruning modules): each checks a value a planted bug changes."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import json
import math
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import tbdiag
import tbdiag.io.checkpoint
import tbdiag.pruning.files
import tbdiag.pruning.tensors
from tbdiag.errors import TbdiagError
from tbdiag.pruning.core import prune
from tbdiag.io.st_reader import read_header
from tbdiag.pruning.magnitude import prune_slices_, prune_smallest_
from tbdiag.pruning.tensors import _copy_bytes, tied_names
from tests.conftest import write_bin_shards
from tests.test_prune import fixed_alphas, mlp_state, saved
from tests.test_prune_edges import file_tensors, moe_state


@contextlib.contextmanager
def deadline(seconds: float):
    """A TimeoutError instead of a hang (a selection that never ends fails the test rather than blocking it)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- magnitude ------------------------------------------------------------------------------------------------


def test_pruning_one_entry_zeroes_the_smallest_magnitude():
    weight = torch.tensor([3.0, -1.0, 2.0])
    prune_smallest_(weight, 1)
    assert weight.tolist() == [3.0, 0.0, 2.0]


def test_float64_magnitudes_are_ranked_at_full_precision():
    weight = torch.tensor([1.0 + 1e-12, 1.0], dtype=torch.float64)
    prune_smallest_(weight, 1)
    assert weight.tolist() == [1.0 + 1e-12, 0.0]


def test_a_slice_already_at_its_target_keeps_its_bytes_negative_zeros_included():
    weight = torch.tensor([-0.0, 3.0, 1.0, 2.0])
    counts = prune_slices_(weight, {None: 1})
    assert counts == {None: (1, 1)}
    assert torch.signbit(weight).tolist() == [True, False, False, False]


@pytest.mark.parametrize("tie_at_the_kth", [False, True])
def test_a_large_tensor_loses_exactly_its_k_smallest_when_the_kth_is_a_bisection_midpoint(tie_at_the_kth):
    n, k = 200_000, 100_000
    bits = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    if tie_at_the_kth:
        bits[bits == k] = k - 1
    weight = bits.view(torch.float32).clone()  # magnitudes ordered as their bit patterns 0 … n-1; the k-th is n/2 - 1
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torch.sort(bits, stable=True).indices[:k]] = True
    with deadline(10):
        prune_smallest_(weight, k)
    assert torch.equal(weight == 0, expected)


def test_the_exact_selection_of_a_large_tensor_sees_at_most_65536_candidates(monkeypatch):
    n = 200_000
    weight = torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(torch.int32).view(torch.float32).clone()
    selected_from = []
    kthvalue = torch.kthvalue
    monkeypatch.setattr(torch, "kthvalue", lambda t, k: selected_from.append(t.numel()) or kthvalue(t, k))
    prune_smallest_(weight, n // 2)
    assert len(selected_from) == 1 and selected_from[0] <= 1 << 16
    assert int((weight == 0).sum()) == n // 2


def test_more_than_65536_tied_magnitudes_are_pruned_by_lowest_index_without_hanging():
    weight = torch.ones(70_000)
    weight[-1] = 2.0
    with deadline(10):
        prune_smallest_(weight, 10)
    assert torch.equal((weight == 0).nonzero().view(-1), torch.arange(10))
    assert float(weight.sum()) == 70_000 - 10 + 1


def test_a_plan_without_output_counts_each_experts_input_zeros_on_its_own_slice(tmp_path):
    state = moe_state()
    stack = "model.layers.0.mlp.experts.down_proj"
    state[stack][1].view(-1)[:100] = 0
    state[stack][3].view(-1)[:7] = 0
    res = prune(saved(tmp_path, state), None, sparsity=0.5, allocation="uniform")
    experts = {x.expert: (x.n_zero_input, x.n_pruned) for x in res.layers if x.tensor == stack}
    assert experts == {0: (0, 4096), 1: (100, 4096), 2: (0, 4096), 3: (7, 4096)}


# --- tensors --------------------------------------------------------------------------------------------------


def pruned_pt(tmp_path, obj, **options) -> dict[str, torch.Tensor]:
    """``obj`` saved with torch.save, pruned uniformly to half, read back from the safetensors output."""
    torch.save(obj, tmp_path / "ckpt.pt")
    prune(tmp_path / "ckpt.pt", tmp_path / "out.safetensors", sparsity=0.5, allocation="uniform", **options)
    return load_file(tmp_path / "out.safetensors")


def physical_order(path) -> list[str]:
    header = read_header(path)[0]
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def test_a_safetensors_copy_keeps_the_inputs_model_order_metadata(tmp_path):
    state = mlp_state()
    order = [f"fc{i}.{part}" for i in range(5) for part in ("weight", "bias")]
    save_file(state, tmp_path / "ckpt.safetensors", metadata={"tbdiag_order": json.dumps(order)})
    prune(tmp_path / "ckpt.safetensors", tmp_path / "out.safetensors", sparsity=0.5, allocation="uniform")
    assert json.loads(read_header(tmp_path / "out.safetensors")[1]["tbdiag_order"]) == order


def test_a_one_byte_tensor_is_copied_into_a_pruned_safetensors_file(tmp_path):
    state = {**mlp_state(), "flag": torch.tensor([7], dtype=torch.uint8)}
    prune(saved(tmp_path, state), tmp_path / "out.safetensors", sparsity=0.5, allocation="uniform")
    written = file_tensors(tmp_path / "out.safetensors")
    assert torch.equal(written["flag"], state["flag"])
    assert all(torch.equal(written[n], state[n]) for n in state if n.endswith(".bias"))


def test_the_pruned_files_header_is_compact_json_padded_with_spaces(tmp_path):
    prune(saved(tmp_path, mlp_state()), tmp_path / "out.safetensors", sparsity=0.5, allocation="uniform")
    raw = (tmp_path / "out.safetensors").read_bytes()
    text = raw[8:8 + int.from_bytes(raw[:8], "little")].decode()
    assert text == json.dumps(json.loads(text), separators=(",", ":")).ljust(len(text)) and len(text) % 8 == 0


def test_a_safetensors_input_truncated_while_it_is_pruned_is_named(tmp_path, monkeypatch):
    path = saved(tmp_path, mlp_state())
    read = tbdiag.pruning.tensors.read_header

    def then_truncated(src):
        header, metadata, start = read(src)
        os.truncate(src, start)
        return header, metadata, start

    monkeypatch.setattr(tbdiag.pruning.tensors, "read_header", then_truncated)
    with pytest.raises(TbdiagError, match=f"^{re.escape(str(path))}: file ended inside a tensor"):
        prune(path, tmp_path / "out.safetensors", sparsity=0.5, allocation="uniform")


def test_a_file_that_ends_inside_a_tensor_is_named_as_truncated():
    with pytest.raises(TbdiagError, match=r"^x\.safetensors: file ended inside a tensor \(truncated while pruning\); "
                                          r"re-download it$"):
        _copy_bytes(io.BytesIO(b"abc"), io.BytesIO(), 1, 10, Path("x.safetensors"))


def test_a_torchscript_checkpoint_is_pruned_when_trusted(tmp_path):
    torch.manual_seed(0)
    model = torch.jit.script(nn.Sequential(*(nn.Linear(64, 64) for _ in range(4))))
    model.save(str(tmp_path / "model.pt"))
    res = prune(tmp_path / "model.pt", tmp_path / "out.safetensors", sparsity=0.5, allocation="uniform",
                trust_pickle=True)
    written = load_file(tmp_path / "out.safetensors")
    assert sorted(written) == sorted(model.state_dict())
    assert [(x.tensor, int((written[x.tensor] == 0).sum())) for x in res.layers] == [("1.weight", 2048),
                                                                                     ("2.weight", 2048)]


def test_a_legacy_pytorch_file_is_pruned(tmp_path):
    torch.save(mlp_state(), tmp_path / "ckpt.pt", _use_new_zipfile_serialization=False)
    prune(tmp_path / "ckpt.pt", tmp_path / "out.safetensors", sparsity=0.5, allocation="uniform")
    assert int((load_file(tmp_path / "out.safetensors")["fc2.weight"] == 0).sum()) == 3072


def test_a_trusted_pickle_with_other_objects_is_pruned(tmp_path):
    written = pruned_pt(tmp_path, {"state_dict": mlp_state(), "args": argparse.Namespace(lr=0.1)}, trust_pickle=True)
    assert int((written["fc2.weight"] == 0).sum()) == 3072


def test_key_chooses_the_state_dict_of_a_pytorch_file_with_two(tmp_path):
    state = mlp_state()
    written = pruned_pt(tmp_path, {"model": {"other.weight": torch.ones(3)}, "ema": state}, key="ema")
    assert sorted(written) == sorted(state) and int((written["fc2.weight"] == 0).sum()) == 3072


def test_a_name_repeated_after_cleaning_keeps_its_first_tensor_and_the_rest_are_written(tmp_path):
    state = mlp_state()
    obj = {"fc0.weight": state["fc0.weight"], "module.fc0.weight": torch.zeros(64, 64), **state}
    written = pruned_pt(tmp_path, obj)
    assert sorted(written) == sorted(state) and torch.equal(written["fc0.weight"], state["fc0.weight"])


def test_two_empty_views_of_one_storage_are_two_tensors(tmp_path):
    base = torch.ones(4)
    written = pruned_pt(tmp_path, {**mlp_state(), "a.empty": base[:0], "b.empty": base[:0]})
    assert written["a.empty"].shape == written["b.empty"].shape == (0,)


def test_a_tied_one_element_tensor_is_written_under_both_names(tmp_path):
    scale = torch.tensor([2.5])
    written = pruned_pt(tmp_path, {**mlp_state(), "scale": scale, "scale_alias": scale})
    assert written["scale"].tolist() == written["scale_alias"].tolist() == [2.5]


def test_a_pytorch_file_that_no_longer_matches_its_reading_is_refused(tmp_path):
    torch.save(mlp_state(), tmp_path / "ckpt.pt")
    ckpt = tbdiag.io.checkpoint.open_checkpoint(tmp_path / "ckpt.pt")
    with pytest.raises(TbdiagError, match=f"^{re.escape(str(tmp_path / 'ckpt.pt'))}: changed while it was being "
                                          "pruned; nothing was written; prune a checkpoint that is not being "
                                          "rewritten$"):
        tied_names(tmp_path / "ckpt.pt", ckpt.tensors[1:], key=None, trust_pickle=False)


def test_a_pytorch_file_is_written_larger_dtypes_first_then_by_name_tied_names_included(tmp_path):
    state = {"b.weight": torch.ones(2, dtype=torch.float16), "step": torch.tensor(3), **mlp_state()}
    state["a_tied.weight"] = state["fc3.weight"]
    pruned_pt(tmp_path, state)
    names = [f"fc{i}.{part}" for i in range(5) for part in ("bias", "weight")]
    assert physical_order(tmp_path / "out.safetensors") == ["step", "a_tied.weight", *names, "b.weight"]


def test_a_non_contiguous_weight_of_a_pytorch_file_is_pruned(tmp_path):
    state = mlp_state()
    state["fc2.weight"] = state["fc2.weight"].t().contiguous().t()
    written = pruned_pt(tmp_path, state)
    kept = written["fc2.weight"] != 0
    assert int((~kept).sum()) == 3072 and torch.equal(written["fc2.weight"][kept], state["fc2.weight"][kept])


# --- results --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"sparsity": 0.5, "epsilon": 1.0}, "epsilon 1.0: must be at least 0 and below 1; e.g. 0.3 (0: uniform)"),
    ({"sparsity": 0.9, "max_sparsity": 0.8}, "max sparsity 0.8: must lie between the target 0.9 and 1; e.g. 0.99"),
    ({"sparsity": 0.5, "unit": "row"}, "unit 'row': unknown; use one of layer, block"),
    ({"sparsity": 0.5, "fit": "mle"}, "fit 'mle': unknown; use one of median, ks, peak"),
    ({"sparsity": 0.5, "min_evals": 1}, "min_evals 1: must be at least 2 (a fit needs 2 eigenvalues)"),
])
def test_bad_options_are_refused_by_name_before_the_checkpoint_is_looked_for(tmp_path, options, message):
    with pytest.raises(TbdiagError, match=f"^{re.escape(message)}$"):
        prune(tmp_path / "absent.safetensors", tmp_path / "out.safetensors", **options)


def test_the_allocation_json_of_a_uniform_run_records_every_parameter_and_count(tmp_path):
    state = mlp_state()
    state["fc2.weight"].view(-1)[:100] = 0
    path = saved(tmp_path, state)
    prune(path, sparsity=0.5, allocation="uniform", max_sparsity=0.9, min_evals=40, peak_lower_bound_quirk=True,
          allocation_json=tmp_path / "a.json")
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc == {
        "schema": "tbdiag.allocation/v1", "tbdiag_version": tbdiag.__version__, "source": str(path),
        "target": "sparsity", "unit": "layer", "fit": None,
        "parameters": {"sparsity": 0.5, "epsilon": 0.0, "max_sparsity": 0.9, "allocation": "uniform",
                       "include_first_last": False, "min_evals": 40, "peak_lower_bound_quirk": True},
        "layers": {
            "fc1": {"alpha": None, "layers": ["fc1"], "n_params": 6144, "sparsity": 0.5, "n_pruned": 3072,
                    "n_zero_input": 0},
            "fc2": {"alpha": None, "layers": ["fc2"], "n_params": 6144, "sparsity": 0.5, "n_pruned": 3072,
                    "n_zero_input": 100},
            "fc3": {"alpha": None, "layers": ["fc3"], "n_params": 8192, "sparsity": 0.5, "n_pruned": 4096,
                    "n_zero_input": 0},
        },
        "n_params": 20480, "n_pruned": 10240, "n_zero_input": 100, "realised_mean": 0.5, "fallbacks": [],
    }


def test_the_allocation_json_of_an_alpha_run_records_its_fit_epsilon_and_fallbacks(tmp_path, monkeypatch):
    path = saved(tmp_path, mlp_state())
    fixed_alphas(monkeypatch, {"fc0": 3.0, "fc1": 2.0, "fc2": math.nan, "fc3": 4.0})
    res = prune(path, sparsity=0.5, epsilon=0.2, fit="ks", include_first_last=True,
                allocation_json=tmp_path / "a.json")
    doc = json.loads((tmp_path / "a.json").read_text())
    assert (doc["fit"], doc["parameters"]["epsilon"], doc["parameters"]["include_first_last"]) == ("ks", 0.2, True)
    fc2 = next(x for x in res.layers if x.name == "fc2")
    assert doc["fallbacks"] == [{"layer": "fc2", "status": "zero_matrix", "sparsity": fc2.sparsity,
                                 "from": "ratio 1, the middle of the range"}]


def test_the_allocation_json_text_is_indented_by_one_space_and_ends_with_a_newline(tmp_path):
    prune(saved(tmp_path, mlp_state()), sparsity=0.5, allocation="uniform", allocation_json=tmp_path / "a.json")
    text = (tmp_path / "a.json").read_text()
    assert text.startswith('{\n "schema": "tbdiag.allocation/v1",\n "tbdiag_version": ')
    assert text.endswith('\n "fallbacks": []\n}\n')


# --- files ----------------------------------------------------------------------------------------------------


def nested_shards(folder) -> dict[str, torch.Tensor]:
    """A safetensors folder whose index puts the first five tensors two folders down (a/b/model-1.safetensors)."""
    state, where = mlp_state(), {}
    (folder / "a" / "b").mkdir(parents=True)
    names = list(state)
    for file, part in (("a/b/model-1.safetensors", names[:5]), ("model-2.safetensors", names[5:])):
        save_file({k: state[k] for k in part}, folder / file)
        where.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": where}))
    return state


def test_a_pytorch_tensor_safetensors_cannot_hold_is_refused_by_name(tmp_path):
    state = {**mlp_state(), "z": torch.zeros(2, dtype=torch.complex64)}
    torch.save(state, tmp_path / "ckpt.pt")
    message = (f"{tmp_path / 'ckpt.pt'}: tensor z is torch.complex64, which a safetensors file cannot hold; "
               "convert or drop it before pruning")
    with pytest.raises(TbdiagError, match=f"^{re.escape(message)}$"):
        prune(tmp_path / "ckpt.pt", tmp_path / "out.safetensors", sparsity=0.5, allocation="uniform")


def test_a_new_output_folder_has_the_usual_permissions(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    nested_shards(src)
    umask = os.umask(0)
    os.umask(umask)
    prune(src, tmp_path / "out", sparsity=0.5, allocation="uniform")
    assert (tmp_path / "out").stat().st_mode & 0o7777 == 0o777 & ~umask


def test_shards_two_folders_down_are_written_at_the_same_place(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    state = nested_shards(src)
    prune(src, tmp_path / "out", sparsity=0.5, allocation="uniform")
    written = file_tensors(tmp_path / "out" / "a" / "b" / "model-1.safetensors")
    assert sorted(written) == sorted(list(state)[:5]) and int((written["fc1.weight"] == 0).sum()) == 3072


def test_an_empty_output_folder_is_emptied_again_subfolders_included_when_the_allocation_cannot_be_placed(
        tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    nested_shards(src)

    def failing(temps):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tbdiag.pruning.files, "replace_all", failing)
    with pytest.raises(TbdiagError, match="nothing was written"):
        prune(src, out, sparsity=0.5, allocation="uniform", allocation_json=tmp_path / "a.json")
    assert list(out.iterdir()) == []


def test_a_folder_of_pytorch_shards_that_needs_trust_is_pruned_with_it(tmp_path):
    state = mlp_state()
    src = write_bin_shards(tmp_path / "in", state)
    for shard in sorted(src.glob("*.bin")):
        torch.save({"state_dict": torch.load(shard), "args": argparse.Namespace(lr=0.1)}, shard)
    prune(src, tmp_path / "out", sparsity=0.5, allocation="uniform", trust_pickle=True)
    written = {k: v for f in sorted((tmp_path / "out").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert sorted(written) == sorted(state) and int((written["fc2.weight"] == 0).sum()) == 3072


def test_key_selects_the_state_dict_in_each_pytorch_shard_of_a_folder(tmp_path):
    state = mlp_state()
    src = write_bin_shards(tmp_path / "in", state)
    for shard in sorted(src.glob("*.bin")):
        torch.save({"model": {"other.weight": torch.ones(3)}, "ema": torch.load(shard)}, shard)
    prune(src, tmp_path / "out", sparsity=0.5, allocation="uniform", key="ema")
    written = {k: v for f in sorted((tmp_path / "out").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert sorted(written) == sorted(state) and int((written["fc2.weight"] == 0).sum()) == 3072


def test_only_the_first_pytorch_model_of_a_shards_name_becomes_model(tmp_path):
    state, src = mlp_state(), tmp_path / "in"
    src.mkdir()
    names, where = list(state), {}
    for i, part in enumerate((names[:5], names[5:]), 1):
        file = f"pytorch_model-{i}.pytorch_model.bin"
        torch.save({k: state[k] for k in part}, src / file)
        where.update(dict.fromkeys(part, file))
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": where}))
    prune(src, tmp_path / "out", sparsity=0.5, allocation="uniform")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "model-1.pytorch_model.safetensors", "model-2.pytorch_model.safetensors", "model.safetensors.index.json"]


@pytest.mark.parametrize("out, message", [
    ("in/pruned", "{out}: is inside the input folder {src} (or holds it); write the pruned model to a new folder "
                  "outside it"),
    ("out.safetensors", "{out}: a sharded input is written as a folder of shards, not a .safetensors file; name a new "
                        "folder (e.g. pruned/)"),
])
def test_an_output_inside_the_input_or_named_as_one_file_is_refused_with_the_way_out(tmp_path, out, message):
    src = tmp_path / "in"
    src.mkdir()
    nested_shards(src)
    message = message.format(out=tmp_path / out, src=src)
    with pytest.raises(TbdiagError, match=f"^{re.escape(message)}$"):
        prune(src, tmp_path / out, sparsity=0.5, allocation="uniform")


def test_the_index_of_a_pruned_folder_is_written_with_two_space_indents(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    nested_shards(src)
    prune(src, tmp_path / "out", sparsity=0.5, allocation="uniform")
    text = (tmp_path / "out" / "model.safetensors.index.json").read_text()
    assert text == json.dumps(json.loads((src / "model.safetensors.index.json").read_text()), indent=2) + "\n"


def test_a_non_empty_output_folder_is_refused_with_the_way_out(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    nested_shards(src)
    out.mkdir()
    (out / "keep.txt").write_text("x")
    message = (f"{out}: exists and is not an empty folder; a folder input is written as a new folder: name a new (or "
               "empty) folder")
    with pytest.raises(TbdiagError, match=f"^{re.escape(message)}$"):
        prune(src, out, sparsity=0.5, allocation="uniform")


def test_an_output_folder_whose_parent_is_missing_is_refused_by_name(tmp_path):
    src, out = tmp_path / "in", tmp_path / "missing" / "out"
    src.mkdir()
    nested_shards(src)
    message = f"{out}: folder {out.parent} does not exist; create it or choose another path"
    with pytest.raises(TbdiagError, match=f"^{re.escape(message)}$"):
        prune(src, out, sparsity=0.5, allocation="uniform")


def test_an_output_folder_whose_parent_is_not_writable_is_refused_by_name(tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    nested_shards(src)
    monkeypatch.setattr(tbdiag.pruning.files.os, "access", lambda path, mode: not mode & os.W_OK)
    message = f"{out}: folder {out.parent} is not writable; choose another path"
    with pytest.raises(TbdiagError, match=f"^{re.escape(message)}$"):
        prune(src, out, sparsity=0.5, allocation="uniform")


def test_a_write_that_fails_names_the_output_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    src = tmp_path / "in.safetensors"
    save_file({"fc1.weight": torch.randn(64, 64), "fc2.weight": torch.randn(64, 64)}, src)

    def disk_full(source, dst, cuts, key=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(tbdiag.pruning.files, "copy_safetensors", disk_full)
    out = tmp_path / "out.safetensors"
    with pytest.raises(TbdiagError) as info:
        prune(src, out, sparsity=0.5, allocation="uniform", include_first_last=True, min_evals=2,
              allocation_json=tmp_path / "a.json")
    assert str(info.value).startswith(f"{out}: cannot write (No space left on device); nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_a_checkpoint_that_needs_unpickling_is_refused_unless_trusted(tmp_path):
    src = tmp_path / "module.pt"
    torch.save(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), src)
    with pytest.raises(TbdiagError, match="trust_pickle=True"):
        prune(src, tmp_path / "out.safetensors", sparsity=0.5, allocation="uniform")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_plan_without_output_names_no_output(tmp_path):
    src = saved(tmp_path, mlp_state())
    result = prune(src, None, sparsity=0.5, allocation="uniform")
    assert result.out is None and result.n_pruned > 0


def test_nothing_to_prune_names_the_flags_that_widen_the_choice(tmp_path):
    from typer.testing import CliRunner

    from tbdiag.cli import app

    src = tmp_path / "two.safetensors"
    save_file({"fc0.weight": torch.randn(64, 64), "fc1.weight": torch.randn(10, 64)}, src)
    res = CliRunner().invoke(app, ["prune", str(src), "--sparsity", "0.5", "--out", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2 and "--include-first-last" in res.output and "lower --min-evals" in res.output


# --- core -----------------------------------------------------------------------------------------------------


def test_prune_and_allocate_defaults_are_the_documented_ones(tmp_path):
    from tbdiag.io.checkpoint import open_checkpoint
    from tbdiag.pruning.core import allocate
    from tbdiag.pruning.results import PruneOptions

    src = saved(tmp_path, mlp_state())
    result = prune(src, sparsity=0.5)
    assert result.options == PruneOptions(0.5, "alpha", 0.3, 0.99, "layer", False, 50, "peak", False)
    allotted = allocate(open_checkpoint(src), result.options)  # the same device default as prune's
    assert [(a.name, a.n_target) for a in allotted] == [(x.name, x.n_target) for x in result.layers]


def test_the_device_reaches_the_fit_and_is_checked(tmp_path):
    src = saved(tmp_path, mlp_state())
    with pytest.raises(TbdiagError, match=r"^device cuda:99: "):
        prune(src, sparsity=0.5, device="cuda:99")
    assert prune(src, sparsity=0.5, device="cpu").layers == prune(src, sparsity=0.5).layers


def quirk_state() -> dict[str, torch.Tensor]:
    """fc1 (100 × 50, 50 eigenvalues) is a Marchenko–Pastur matrix whose peak fit the lower-bound quirk changes."""
    g = torch.Generator().manual_seed(2)
    fc1 = torch.randn(100, 50, generator=g, dtype=torch.float64)
    return {"fc0.weight": torch.randn(50, 50, dtype=torch.float64), "fc1.weight": fc1,
            "fc2.weight": torch.randn(50, 100, dtype=torch.float64), "fc3.weight": torch.randn(10, 50, dtype=torch.float64)}


def test_the_peak_lower_bound_quirk_reaches_the_fit(tmp_path):
    src = saved(tmp_path, quirk_state())
    for quirk in (False, True):
        want = {r.name: r.alpha for r in tbdiag.analyze(src, fit="peak", peak_lower_bound_quirk=quirk).layers}
        got = prune(src, sparsity=0.5, peak_lower_bound_quirk=quirk)
        assert {x.name: x.alpha for x in got.layers} == {"fc1": want["fc1"], "fc2": want["fc2"]}
    plain = prune(src, sparsity=0.5).layers[0].alpha
    assert prune(src, sparsity=0.5, peak_lower_bound_quirk=True).layers[0].alpha != pytest.approx(plain)


def test_a_fit_without_a_number_is_named_not_finite(tmp_path, monkeypatch):
    import tbdiag.pruning.core as core

    src = saved(tmp_path, mlp_state())
    real = core.measure_layers

    def nan_fc2(specs, options):
        return [dataclasses.replace(r, alpha=math.nan) if r.name == "fc2" else r for r in real(specs, options)]

    monkeypatch.setattr(core, "measure_layers", nan_fc2)
    result = prune(src, sparsity=0.5)
    assert {x.name: x.status for x in result.layers} == {"fc1": "ok", "fc2": "not_finite", "fc3": "ok"}
    assert [x.name for x in result.fallbacks] == ["fc2"]


def test_uniform_layers_are_marked_uniform_and_a_zero_target_prunes_nothing(tmp_path):
    src = saved(tmp_path, mlp_state())
    result = prune(src, tmp_path / "out.safetensors", sparsity=0.0, allocation="uniform")
    assert [x.status for x in result.layers] == ["uniform"] * 3
    assert [x.n_target for x in result.layers] == [0, 0, 0] and result.n_pruned == 0
    assert all(int((t == 0).sum()) == 0 for t in load_file(tmp_path / "out.safetensors").values())


def test_max_sparsity_caps_the_alpha_allocation(tmp_path, monkeypatch):
    src = saved(tmp_path, mlp_state())
    fixed_alphas(monkeypatch, {"fc1": 1.0, "fc2": 2.0, "fc3": 9.0})
    capped = prune(src, sparsity=0.5, epsilon=0.9, max_sparsity=0.6)
    assert max(x.sparsity for x in capped.layers) == pytest.approx(0.6)
    assert max(x.sparsity for x in prune(src, sparsity=0.5, epsilon=0.9).layers) > 0.7


def test_the_result_names_its_output(tmp_path):
    src = saved(tmp_path, mlp_state())
    out = tmp_path / "out.safetensors"
    result = prune(src, out, sparsity=0.5, allocation="uniform")
    assert result.out == str(out)


def test_an_existing_checkpoint_is_replaced_only_with_overwrite(tmp_path):
    src = saved(tmp_path, mlp_state())
    victim = saved(tmp_path, {"keep.weight": torch.ones(3, 3)}, "victim.safetensors")
    with pytest.raises(TbdiagError, match="overwrite=True"):
        prune(src, victim, sparsity=0.5, allocation="uniform")
    assert list(load_file(victim)) == ["keep.weight"]
    result = prune(src, victim, sparsity=0.5, allocation="uniform", overwrite=True)
    assert sorted(load_file(victim)) == sorted(mlp_state()) and result.n_pruned > 0


def test_a_plan_of_a_pytorch_file_needs_no_safetensors_dtypes(tmp_path):
    state = {**mlp_state(), "z": torch.zeros(2, dtype=torch.complex64)}
    torch.save(state, tmp_path / "ckpt.pt")
    result = prune(tmp_path / "ckpt.pt", None, sparsity=0.5, allocation="uniform")
    assert [x.name for x in result.layers] == ["fc1", "fc2", "fc3"] and result.out is None


def test_fp8_weights_are_refused_by_name_before_anything_is_written(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {f"fc{i}.weight": torch.randn(256, 256, generator=g) for i in range(3)}
    state["fc1.weight"] = torch.randn(256, 384, generator=g).to(torch.float8_e4m3fn)
    state["fc1.weight_scale_inv"] = torch.rand(2, 3, generator=g) + 0.5
    src = saved(tmp_path, state)
    message = (f"{src}: fc1.weight is torch.float8_e4m3fn; pruning FP8 weights is not supported: "
               "dequantise the checkpoint first")
    with pytest.raises(TbdiagError, match=f"^{re.escape(message)}$"):
        prune(src, tmp_path / "out.safetensors", sparsity=0.5, include_first_last=True, allocation="uniform")
    assert not (tmp_path / "out.safetensors").exists()


def test_nothing_to_prune_says_why_and_how_in_library_words(tmp_path):
    src = tmp_path / "two.safetensors"
    save_file({"fc0.weight": torch.randn(64, 64), "fc1.weight": torch.randn(10, 64)}, src)
    with pytest.raises(TbdiagError) as err:
        prune(src, sparsity=0.5, min_evals=20)
    assert str(err.value) == (f"{src}: no layer to prune (Linear/Conv weights with ≥ 20 eigenvalues, input and output "
                              "layers left dense); include the first and last layers, lower the eigenvalue minimum, "
                              "or pass a model checkpoint")
    assert err.value.cli == {"include the first and last layers": "--include-first-last",
                             "lower the eigenvalue minimum": "lower --min-evals"}


def test_prune_logs_its_fallbacks_and_its_realised_mean(tmp_path, monkeypatch, caplog):
    src = saved(tmp_path, mlp_state())
    fixed_alphas(monkeypatch, {"fc1": math.nan, "fc2": 2.0, "fc3": math.nan})
    with caplog.at_level("INFO", logger="tbdiag.pruning.core"):
        result = prune(src, sparsity=0.5)
    messages = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "tbdiag.pruning.core"]
    assert messages == [
        ("WARNING", f"{src}: alpha not finite for 2 of 3 layers, allocated without it: "
                    f"{result.fallback_notes()[0]}; {result.fallback_notes()[1]}"),
        ("INFO", f"{src}: 3 layers, realised mean sparsity {result.realised_mean:.6f} (target 0.5)")]
    assert [n.split(":")[0] for n in result.fallback_notes()] == ["fc1 (zero_matrix)", "fc3 (zero_matrix)"]
