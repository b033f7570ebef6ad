"""Tests written against surviving mutants of benchmarks/mutation.sh (finetune modules): each checks a value a planted bug changes."""

from __future__ import annotations

import math

import pytest
import torch

from tbdiag import TbdiagError, analyze


def sq_evals(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.double()).square().sort().values


# --- delta: ΔW = W − W_base ---------------------------------------------------------------------------------


def _weights(*names: str, shape: tuple[int, int] = (8, 4)) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {f"{name}.weight": torch.randn(*shape) for name in names}


def test_delta_names_the_first_missing_layer_and_counts_the_others():
    with pytest.raises(TbdiagError) as info:
        analyze(_weights("a", "b", "c", "keep"), base=_weights("keep"))
    assert str(info.value) == ("<state dict>: layer a and 2 more not in the base <state dict>; pass the base model it "
                               "was fine-tuned from, or leave such layers out with exclude patterns")
    assert info.value.cli_message().endswith("or leave such layers out with --exclude")


def test_delta_with_two_missing_layers_says_one_more():
    with pytest.raises(TbdiagError, match=r"layer a and 1 more not in the base"):
        analyze(_weights("a", "b", "keep"), base=_weights("keep"))


def test_delta_with_one_missing_layer_names_it_alone():
    with pytest.raises(TbdiagError, match=r"layer a not in the base"):
        analyze(_weights("a", "keep"), base=_weights("keep"))


def test_delta_refuses_one_layer_of_another_shape_in_a_flag_naming_line():
    base = dict(_weights("keep"), **_weights("grown", shape=(8, 5)))
    with pytest.raises(TbdiagError) as info:
        analyze(_weights("keep", "grown"), base=base)
    assert str(info.value) == ("<state dict>: layer grown is [8, 4] but [8, 5] in the base <state dict>; pass the base "
                               "model it was fine-tuned from, or leave the layer out with an exclude pattern")
    assert info.value.cli_message().endswith("or leave the layer out with --exclude")


def test_delta_of_bfloat16_weights_is_taken_in_float32():
    torch.manual_seed(1)
    w0 = torch.randn(32, 16).bfloat16()
    w = (3 * torch.randn(32, 16)).bfloat16()  # far from w0: the difference does not fit bfloat16's 8 bits
    a = analyze({"fc.weight": w}, base={"fc.weight": w0}, keep_spectra=True)
    exact = sq_evals(w.float() - w0.float())
    assert torch.allclose(torch.from_numpy(a.spectra["fc"]), exact, rtol=1e-6, atol=0)
    assert not torch.allclose(sq_evals((w - w0).float()), exact, rtol=1e-4, atol=0)  # the bfloat16 difference is seen


@pytest.mark.parametrize("wide", ["tuned", "base"])
def test_delta_is_taken_in_float64_when_either_side_is(wide):
    torch.manual_seed(2)
    narrow = 1e4 * torch.randn(32, 16)
    step = 1e-6 * torch.randn(32, 16, dtype=torch.float64)  # far below float32's resolution at 1e4
    w, w0 = (narrow.double() + step, narrow) if wide == "tuned" else (narrow, narrow.double() - step)
    a = analyze({"fc.weight": w}, base={"fc.weight": w0}, keep_spectra=True)
    assert torch.allclose(torch.from_numpy(a.spectra["fc"]), sq_evals(step), rtol=1e-6, atol=0)


@pytest.mark.parametrize("wide", ["tuned", "base"])
def test_delta_plan_reads_float64_bytes_when_either_side_is_float64(wide, monkeypatch, tmp_path):
    from safetensors.torch import save_file

    from tbdiag.analysis.options import AnalyzeOptions
    from tbdiag.analysis.plan import make_plan

    monkeypatch.setattr("tbdiag.analysis.plan._rates", lambda device, dtype: (1e-9, 1e-9))
    tuned_dtype, base_dtype = (torch.float64, torch.float32) if wide == "tuned" else (torch.float32, torch.float64)
    w, w0 = torch.randn(8, 4, dtype=tuned_dtype), torch.randn(8, 4, dtype=base_dtype)
    save_file({"fc.weight": w}, tmp_path / "tuned.safetensors")
    save_file({"fc.weight": w0}, tmp_path / "base.safetensors")
    plan = make_plan(str(tmp_path / "tuned.safetensors"), AnalyzeOptions(), base=str(tmp_path / "base.safetensors"))
    assert plan.layers[0].bytes == 8 * 32 * 2  # float64 entries, two tensors read


def test_delta_spec_keeps_the_tuned_tensors_identity():
    """pair_specs' ΔW ref describes the fine-tuned tensor (name, shape, kind hint, layout), only its load differs."""
    from tbdiag.esd.layers import LayerSpec
    from tbdiag.finetune.delta import pair_specs
    from tbdiag.io.tensors import TensorRef

    w, w0 = torch.ones(6, 4), torch.zeros(6, 4)
    tuned = TensorRef("h.0.c_fc.weight", (6, 4), torch.float32, load=lambda: w, kind_hint="linear", transposed=True)
    base = TensorRef("h.0.c_fc.weight", (6, 4), torch.float32, load=lambda: w0)
    (spec,), base_only = pair_specs([LayerSpec("h.0.c_fc", "linear", (6, 4), tuned, "h.0.c_fc.weight")],
                                    [LayerSpec("h.0.c_fc", "linear", (6, 4), base, "h.0.c_fc.weight")], "t", "b")
    assert spec.ref == tuned and base_only == 0  # name, shape, dtype, kind hint and layout (load is not compared)
    assert torch.equal(spec.ref.load(), w - w0)


# --- lora_config: adapter_config.json ---------------------------------------------------------------------------


def _config_folder(tmp_path, config):
    import json

    (tmp_path / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return tmp_path


def _config_error(tmp_path, config) -> str:
    from tbdiag.errors import CheckpointError
    from tbdiag.finetune.lora_config import read_config

    folder = _config_folder(tmp_path, config)
    with pytest.raises(CheckpointError) as info:
        read_config(folder)
    return str(info.value).removeprefix(f"{folder / 'adapter_config.json'}: ")


def test_config_without_peft_type_is_read_as_lora_with_empty_patterns(tmp_path):
    from tbdiag.finetune.lora_config import read_config

    config = read_config(_config_folder(tmp_path, {"r": 4, "lora_alpha": 0.5}))
    assert config == {"r": 4, "lora_alpha": 0.5, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": []}


def test_config_keeps_its_modules_to_save_and_patterns(tmp_path):
    from tbdiag.finetune.lora_config import read_config

    config = read_config(_config_folder(tmp_path, {"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                                                   "modules_to_save": ["classifier", "score"],
                                                   "rank_pattern": {"q": 2}, "alpha_pattern": {"v": 3.5}}))
    assert (config["modules_to_save"], config["rank_pattern"], config["alpha_pattern"]) == (
        ["classifier", "score"], {"q": 2}, {"v": 3.5})


def test_config_with_one_module_to_save_as_a_string_lists_it(tmp_path):
    from tbdiag.finetune.lora_config import read_config

    config = read_config(_config_folder(tmp_path, {"r": 4, "lora_alpha": 8, "modules_to_save": "classifier"}))
    assert config["modules_to_save"] == ["classifier"]


def test_config_that_is_not_json_is_refused_with_the_parser_message(tmp_path):
    message = _config_error(tmp_path, "{r: 4")
    assert message.startswith("not a readable adapter config (Expecting property name enclosed in double quotes")
    assert message.endswith("); re-save the adapter")


def test_config_that_is_not_a_json_object_is_refused(tmp_path):
    assert _config_error(tmp_path, [4, 8]) == "not an adapter config (a JSON object); re-save the adapter"


def test_config_of_another_adapter_type_is_refused_by_name(tmp_path):
    assert _config_error(tmp_path, {"peft_type": "IA3", "r": 4, "lora_alpha": 8}) == (
        "a IA3 adapter; only LoRA adapters are analysed")


def test_config_of_a_dora_adapter_says_to_merge_it(tmp_path):
    assert _config_error(tmp_path, {"r": 4, "lora_alpha": 8, "use_dora": True}) == (
        "a DoRA adapter (its update is not s·B·A); merge it into the base model (merge_and_unload) and analyse the "
        "merged model against the base instead")


@pytest.mark.parametrize("r, shown", [(True, "True"), (-4, "-4"), ("4", "'4'")])
def test_config_rank_must_be_a_positive_number_not_a_bool_or_a_string(tmp_path, r, shown):
    message = _config_error(tmp_path, {"r": r, "lora_alpha": 8})
    assert message == f"r is {shown}, not a positive number; re-save the adapter"


def test_config_pattern_that_is_not_a_map_is_refused(tmp_path):
    assert _config_error(tmp_path, {"r": 4, "lora_alpha": 8, "rank_pattern": [["q", 2]]}) == (
        "rank_pattern is [['q', 2]], not a map of regular expressions to positive numbers; re-save the adapter")


def test_config_alpha_pattern_with_a_negative_alpha_is_refused(tmp_path):
    assert _config_error(tmp_path, {"r": 4, "lora_alpha": 8, "alpha_pattern": {"q": -1}}).startswith(
        "alpha_pattern is {'q': -1}, not a map")


def test_config_modules_to_save_of_non_names_is_refused(tmp_path):
    assert _config_error(tmp_path, {"r": 4, "lora_alpha": 8, "modules_to_save": {"head": 1}}) == (
        "modules_to_save is {'head': 1}, not a list of module names; re-save the adapter")


# --- diff: two analyses compared --------------------------------------------------------------------------------


def test_diff_without_a_common_layer_names_the_first_layer_of_each_side():
    from tbdiag.finetune.diff import diff

    a, b = analyze(_weights("a1", "a2")), analyze(_weights("b1", "b2"))
    with pytest.raises(TbdiagError) as info:
        diff(a, b)
    assert str(info.value) == ("<state dict> and <state dict> have no layer in common (a1 … and b1 …); compare two "
                               "versions of one model")


def _grown(names: list[str]) -> tuple:
    """Analyses of the same layers, each (8, 4) in A and (8, 5) in B."""
    return analyze(_weights(*names)), analyze(_weights(*names, shape=(8, 5)))


def test_diff_names_three_changed_shapes_in_full():
    from tbdiag.finetune.diff import diff

    with pytest.raises(TbdiagError, match=r"have no layer of one shape in common \(a \[8, 4\] → \[8, 5\], "
                                          r"b \[8, 4\] → \[8, 5\], c \[8, 4\] → \[8, 5\]\);"):
        diff(*_grown(["a", "b", "c"]))


def test_diff_names_the_first_three_changed_shapes_and_counts_the_rest():
    from tbdiag.finetune.diff import diff

    with pytest.raises(TbdiagError, match=r"\(a \[8, 4\] → \[8, 5\], b \[8, 4\] → \[8, 5\], "
                                          r"c \[8, 4\] → \[8, 5\], … \(\+1\)\);"):
        diff(*_grown(["a", "b", "c", "d"]))


def test_diff_to_pandas_has_one_row_per_compared_layer():
    from tbdiag.finetune.diff import diff

    a = analyze(_weights("fc"), fit="median")
    b = analyze({"fc.weight": 2 * _weights("fc")["fc.weight"]}, fit="median")
    doc = diff(a, b)
    frame = doc.to_pandas()
    assert list(frame["name"]) == ["fc"] and frame.loc[0, "shape"] == (8, 4)
    assert frame.loc[0, "log_norm_delta"] == pytest.approx(math.log10(4), rel=1e-12)
    assert frame.loc[0, "log_norm_a"] == doc["layers"][0]["a"]["log_norm"]


def _named(analysis, source: str):
    import dataclasses

    return dataclasses.replace(analysis, source=source)


def test_diff_document_names_its_schema_version_metrics_and_order():
    from tbdiag import __version__
    from tbdiag.finetune.diff import COMPARED, diff

    doc = diff(analyze(_weights("fc")), analyze(_weights("fc")))
    assert {k: doc[k] for k in ("schema", "tbdiag_version", "metrics", "sort")} == {
        "schema": "tbdiag.diff/v1", "tbdiag_version": __version__, "metrics": list(COMPARED),
        "sort": "abs_delta_alpha"}


def test_diff_row_names_the_layer_its_kind_shape_and_both_statuses():
    from tbdiag.finetune.diff import diff

    a = analyze(_weights("fc", shape=(64, 32)))
    b = analyze({"fc.weight": torch.zeros(64, 32)})
    (row,) = diff(a, b)["layers"]
    assert {k: row[k] for k in ("name", "kind", "shape", "status")} == {
        "name": "fc", "kind": "linear", "shape": [64, 32], "status": [a.layers[0].status, "zero_matrix"]}


def test_diff_side_names_its_source_view_base_and_fit():
    from tbdiag.finetune.diff import diff

    w0 = _weights("fc", shape=(64, 32))
    delta = analyze({"fc.weight": 2 * w0["fc.weight"]}, base=w0, fit="median")
    side = diff(delta, delta)["a"]
    assert {k: side[k] for k in ("source", "view", "base", "fit", "randomize")} == {
        "source": "<state dict>", "view": "delta", "base": "<state dict>", "fit": "median", "randomize": False}
    assert side["alpha_mean"] == delta.summary["alpha_mean"]


def test_diff_warns_of_changed_shapes_naming_both_sources(caplog):
    from tbdiag.finetune.diff import diff

    a = _named(analyze(dict(_weights("same"), **_weights("grown"))), "A")
    b = _named(analyze(dict(_weights("same"), **_weights("grown", shape=(8, 5)))), "B")
    diff(a, b)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "A → B: not compared, changed shape: grown [8, 4] → [8, 5]"]


@pytest.mark.parametrize("randomized", ["A", "B"])
def test_diff_warns_which_side_alone_was_randomized(caplog, randomized):
    from tbdiag.finetune.diff import diff

    w = _weights("fc", shape=(64, 32))
    a = _named(analyze(w, randomize=randomized == "A"), "A")
    b = _named(analyze(w, randomize=randomized == "B"), "B")
    diff(a, b)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"only {randomized} was analysed with randomize: the changes of rand_distance, num_traps are missing"]


def _comparison_error(a_options: dict, b_options: dict) -> str:
    from tbdiag.finetune.diff import diff

    w = _weights("fc", shape=(64, 32))
    with pytest.raises(TbdiagError) as info:
        diff(_named(analyze(w, **a_options), "A"), _named(analyze(w, **b_options), "B"))
    return str(info.value)


def test_diff_refuses_another_estimator_by_name():
    assert _comparison_error({}, {"estimator": "farms"}) == (
        "A was analysed with estimator full and B with farms: their alphas are not comparable; analyse both the "
        "same way")


def test_diff_refuses_other_fit_settings_by_name():
    assert _comparison_error({"fit": "median"}, {"fit": "median", "xmin_pos": 3.0}).startswith(
        "A was analysed with fit settings {'xmin_pos': 2.0} and B with {'xmin_pos': 3.0}: their alphas are not")


def test_diff_of_two_farms_analyses_refuses_another_window():
    assert _comparison_error({"estimator": "farms", "farms_window": 8}, {"estimator": "farms", "farms_window": 16}) == (
        "A was analysed with farms_window 8 and B with 16: their alphas are not comparable; analyse both the same way")


def test_diff_of_two_farms_analyses_still_refuses_another_fit():
    assert _comparison_error({"estimator": "farms"}, {"estimator": "farms", "fit": "median"}).startswith(
        "A was analysed with fit ks and B with median:")


def test_diff_of_two_farms_analyses_alike_compares_them():
    from tbdiag.finetune.diff import diff

    w = _weights("fc", shape=(64, 32))
    doc = diff(analyze(w, estimator="farms", farms_per_dim=2), analyze(w, estimator="farms", farms_per_dim=2))
    assert doc["layers"][0]["delta"]["alpha"] == 0


def test_diff_of_two_full_analyses_ignores_their_unused_farms_settings():
    from tbdiag.finetune.diff import diff

    w = _weights("fc", shape=(64, 32))
    doc = diff(analyze(w, farms_window=8), analyze(w, farms_window=16))  # the full estimator: no window used
    assert doc["layers"][0]["delta"]["alpha"] == 0


# --- lora: PEFT LoRA adapter folders ----------------------------------------------------------------------------


def _adapter(folder, tensors: dict, **config):
    """A PEFT-style adapter folder: ``tensors`` under base_model.model., r=2 and lora_alpha=4 unless ``config`` says."""
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    save_file({f"base_model.model.{k}": v for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
    return folder


def _pair(name: str, a_shape: tuple, b_shape: tuple) -> dict:
    torch.manual_seed(0)
    return {f"{name}.lora_A.weight": torch.randn(*a_shape), f"{name}.lora_B.weight": torch.randn(*b_shape)}


def _open_error(folder) -> str:
    from tbdiag.errors import CheckpointError
    from tbdiag.finetune.lora import open_adapter

    with pytest.raises(CheckpointError) as info:
        open_adapter(folder)
    return str(info.value).removeprefix(f"{folder / 'adapter_model.safetensors'}: ")


def test_adapter_factor_without_its_partner_is_refused_by_name(tmp_path):
    folder = _adapter(tmp_path / "ad", {"fc.lora_A.weight": torch.randn(2, 8)})
    assert _open_error(folder) == "fc has lora_A without its partner; re-save the adapter"


def test_adapter_factors_of_two_ranks_are_refused_with_both_shapes(tmp_path):
    folder = _adapter(tmp_path / "ad", _pair("fc", (2, 8), (16, 3)))
    assert _open_error(folder) == "fc: lora_B is [16, 3], lora_A [2, 8]: their ranks differ; re-save the adapter"


def test_adapter_rank_other_than_the_configs_is_refused_in_full(tmp_path):
    folder = _adapter(tmp_path / "ad", _pair("fc", (2, 8), (16, 2)), r=3)
    assert _open_error(folder) == "fc has rank 2 but the config says 3; pass the config saved with these weights"


def test_adapter_without_factors_or_saved_modules_is_refused(tmp_path):
    folder = _adapter(tmp_path / "ad", {"head.weight": torch.randn(4, 8)})
    assert _open_error(folder) == "no LoRA layer found; pass a PEFT LoRA adapter folder"


def test_open_adapter_keeps_source_and_config(tmp_path):
    from tbdiag.finetune.lora import open_adapter

    folder = _adapter(tmp_path / "ad", _pair("fc", (2, 8), (16, 2)), lora_alpha=6)
    adapter = open_adapter(folder)
    assert adapter.source == str(folder) and (adapter.config["r"], adapter.config["lora_alpha"]) == (2, 6)
    (layer,) = adapter.layers
    assert (layer.name, layer.rank, layer.scale, layer.shape) == ("fc", 2, 3.0, (16, 8))


def test_adapter_pairs_of_other_shapes_are_left_out_and_the_rest_kept(tmp_path):
    from tbdiag.finetune.lora import open_adapter

    tensors = {
        "a_emb.lora_embedding_A": torch.randn(2, 8, 1), "a_emb.lora_embedding_B": torch.randn(4, 2, 1),  # 3-D embedding
        **_pair("b_6d", (2, 3, 1, 1, 1, 1), (4, 2, 1, 1, 1, 1)),  # no 4-D convolution
        **_pair("c_kernel", (2, 3, 3, 3), (4, 2, 3, 1)),  # B with a kernel
        **_pair("d_mixed", (2, 3), (4, 2, 1)),  # A linear, B not
        **_pair("z", (2, 8), (16, 2)),
    }
    adapter = open_adapter(_adapter(tmp_path / "ad", tensors))
    assert adapter.other == ("a_emb", "b_6d", "c_kernel", "d_mixed") and [x.name for x in adapter.layers] == ["z"]


def test_adapter_left_out_pairs_are_counted_and_named_in_a_warning(tmp_path, caplog):
    tensors = {**_pair("a", (2, 3), (4, 2, 1)), **_pair("b", (2, 3), (4, 2, 1)), **_pair("c", (2, 3), (4, 2, 1)),
               **_pair("d", (2, 3), (4, 2, 1)), **_pair("z", (2, 8), (16, 2))}
    a = analyze(_adapter(tmp_path / "ad", tensors))
    assert a.summary["skipped"]["adapter_other"] == 4
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{tmp_path / 'ad'}: left out a, b, c, … (+1): neither LoRA factors nor modules_to_save"]


def test_adapter_conv3d_factors_give_a_conv3d_update(tmp_path):
    from tbdiag.finetune.lora import open_adapter

    adapter = open_adapter(_adapter(tmp_path / "ad", _pair("conv", (2, 3, 2, 2, 2), (4, 2, 1, 1, 1))))
    (layer,) = adapter.layers
    assert (layer.kind, layer.shape) == ("conv3d", (4, 3, 2, 2, 2)) and adapter.other == ()


def test_adapter_embedding_factors_give_a_transposed_embedding_update(tmp_path):
    from tbdiag.finetune.lora import open_adapter

    tensors = {"emb.lora_embedding_A": torch.randn(2, 96), "emb.lora_embedding_B": torch.randn(8, 2)}
    (layer,) = open_adapter(_adapter(tmp_path / "ad", tensors)).layers
    assert (layer.kind, layer.shape, layer.transposed) == ("embedding", (96, 8), True)


def test_adapter_rank_and_alpha_patterns_apply_by_module_name(tmp_path):
    from tbdiag.finetune.lora import open_adapter

    tensors = {**_pair("x.fc", (3, 8), (16, 3)), **_pair("x.out", (2, 8), (16, 2))}
    adapter = open_adapter(_adapter(tmp_path / "ad", tensors, rank_pattern={"fc": 3}, alpha_pattern={"fc": 9}))
    assert [(x.name, x.rank, x.scale) for x in adapter.layers] == [("x.fc", 3, 3.0), ("x.out", 2, 2.0)]


def test_adapter_saved_module_keeps_its_matrices_only(tmp_path):
    """modules_to_save: the head's weight is kept (named as in the base), its bias and integer buffers are no
    matrices; another full matrix is left out by name."""
    from tbdiag.finetune.lora import open_adapter

    tensors = {"extra.weight": torch.randn(4, 8), "head.bias": torch.randn(4),
               "head.index": torch.ones(4, 8, dtype=torch.int64), "head.weight": torch.randn(4, 8),
               **_pair("z", (2, 8), (16, 2))}
    adapter = open_adapter(_adapter(tmp_path / "ad", tensors, modules_to_save=["head"]))
    assert [t.name for t in adapter.saved] == ["head.weight"] and adapter.other == ("extra",)  # not a saved module


def test_adapter_with_only_saved_modules_merges_them(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    head = torch.randn(16, 8)
    folder = _adapter(tmp_path / "ad", {"head.weight": head}, modules_to_save=["head"])
    save_file({"head.weight": torch.randn(16, 8)}, tmp_path / "base.safetensors")
    m = analyze(folder, base=tmp_path / "base.safetensors", view="merged", keep_spectra=True)
    assert [r.name for r in m.layers] == ["head"]
    assert torch.allclose(torch.from_numpy(m.spectra["head"]), sq_evals(head), rtol=1e-9, atol=0)


def test_adapter_include_and_exclude_count_the_adapted_layers_left_out(tmp_path):
    tensors = {**_pair("x.q", (2, 8), (16, 2)), **_pair("x.k", (2, 8), (16, 2)), **_pair("x.v", (2, 8), (16, 2))}
    folder = _adapter(tmp_path / "ad", tensors)
    only_q = analyze(folder, include=("*.q",))
    assert [r.name for r in only_q.layers] == ["x.q"] and only_q.summary["skipped"]["excluded"] == 2
    no_kv = analyze(folder, exclude=("*.k", "*.v"))
    assert [r.name for r in no_kv.layers] == ["x.q"] and no_kv.summary["skipped"]["excluded"] == 2


def test_adapter_three_left_out_pairs_are_all_named(tmp_path, caplog):
    tensors = {**_pair("a", (2, 3), (4, 2, 1)), **_pair("b", (2, 3), (4, 2, 1)), **_pair("c", (2, 3), (4, 2, 1)),
               **_pair("z", (2, 8), (16, 2))}
    analyze(_adapter(tmp_path / "ad", tensors))
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{tmp_path / 'ad'}: left out a, b, c: neither LoRA factors nor modules_to_save"]


def test_adapter_delta_leaves_saved_modules_out_and_says_where_they_are(tmp_path, caplog):
    tensors = {"head.weight": torch.randn(4, 8), **_pair("z", (2, 8), (16, 2))}
    a = analyze(_adapter(tmp_path / "ad", tensors, modules_to_save=["head"]))
    assert [r.name for r in a.layers] == ["z"] and a.summary["skipped"]["modules_to_save"] == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{tmp_path / 'ad'}: left out modules_to_save head: full weights, no update (the merged view, with the base "
        "model, analyses them)"]


@pytest.mark.parametrize("base_weights, message", [
    ({"other.weight": (16, 8)}, "adapted layer fc is not a layer of the base model"),
    ({"fc.weight": (16, 9)}, "fc is [16, 8] in the adapter but [16, 9] in the base model"),
])
def test_adapter_merged_into_a_base_without_the_layer_or_of_another_shape_is_refused_in_full(tmp_path, base_weights,
                                                                                            message):
    from safetensors.torch import save_file

    folder = _adapter(tmp_path / "ad", _pair("fc", (2, 8), (16, 2)))
    save_file({k: torch.randn(*shape) for k, shape in base_weights.items()}, tmp_path / "base.safetensors")
    with pytest.raises(TbdiagError) as info:
        analyze(folder, base=tmp_path / "base.safetensors", view="merged")
    assert str(info.value) == f"{folder}: {message}; pass the base model the adapter was trained on"


def _saved_and_adapted(tmp_path):
    """An adapter on z, saving the head and the token embedding in full; its base model."""
    from safetensors.torch import save_file

    torch.manual_seed(2)
    full = {"embed_tokens.weight": torch.randn(96, 16), "head.weight": torch.randn(4, 16)}
    folder = _adapter(tmp_path / "ad", {**full, **_pair("z", (2, 16), (16, 2))},
                      modules_to_save=["head", "embed_tokens"])
    save_file({**{k: torch.randn_like(v) for k, v in full.items()}, "z.weight": torch.randn(16, 16)},
              tmp_path / "base.safetensors")
    return folder, tmp_path / "base.safetensors"


def test_adapter_merged_view_analyses_saved_embeddings_too(tmp_path):
    folder, base = _saved_and_adapted(tmp_path)
    m = analyze(folder, base=base, view="merged")
    assert [(r.name, r.kind) for r in m.layers] == [("z", "linear"), ("embed_tokens", "embedding"), ("head", "linear")]


def test_adapter_merged_view_filters_saved_modules_by_include(tmp_path):
    folder, base = _saved_and_adapted(tmp_path)
    m = analyze(folder, base=base, view="merged", include=("z", "head"))
    assert [r.name for r in m.layers] == ["z", "head"] and m.summary["skipped"]["excluded"] == 1


def test_adapter_merged_into_float32_weights_is_formed_in_float32(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(5)
    w0 = torch.randn(16, 8)
    a, b = torch.randn(2, 8), torch.randn(16, 2)
    folder = _adapter(tmp_path / "ad", {"fc.lora_A.weight": a, "fc.lora_B.weight": b}, lora_alpha=1)  # s = 1/2
    save_file({"fc.weight": w0}, tmp_path / "base.safetensors")
    m = analyze(folder, base=tmp_path / "base.safetensors", view="merged", keep_spectra=True)
    in_float32 = sq_evals(w0 + (0.5 * b.double() @ a.double()).float())
    assert torch.allclose(torch.from_numpy(m.spectra["fc"]), in_float32, rtol=1e-12, atol=0)
    assert not torch.allclose(sq_evals(w0.double() + 0.5 * b.double() @ a.double()), in_float32, rtol=1e-12, atol=0)


def test_adapter_saved_fp8_module_without_its_scale_is_refused_naming_the_adapter(tmp_path):
    tensors = {"head.weight": torch.randn(4, 16).to(torch.float8_e4m3fn), **_pair("z", (2, 16), (16, 2))}
    folder = _adapter(tmp_path / "ad", tensors, modules_to_save=["head"])
    with pytest.raises(TbdiagError) as info:
        analyze(folder)
    assert str(info.value).startswith(f"{folder}: head.weight is torch.float8_e4m3fn without a head.weight_scale_inv "
                                      "or head.weight_scale companion")


# --- randomize: shuffled ESD and correlation traps ------------------------------------------------------------


def test_randomize_permutation_of_the_largest_seed_is_pinned():
    from tbdiag.esd.randomize import permutation

    assert permutation(2 ** 63 - 1, "l1", 0, 8).tolist() == [5, 7, 2, 3, 1, 4, 6, 0]  # folded to 32 bits


def test_randomize_fits_the_bulk_of_a_layer_of_two_eigenvalues():
    torch.manual_seed(0)
    row = analyze({"t.weight": torch.randn(40, 2)}, randomize=True).layers[0]
    assert row.num_traps == 0 and row.rand_bulk_max == pytest.approx(60.2524117, rel=1e-6)


def test_randomize_fits_the_bulk_of_a_layer_of_small_entries():
    torch.manual_seed(0)
    row = analyze({"s.weight": 0.01 * torch.randn(40, 20)}, randomize=True).layers[0]
    assert row.rand_lambda_max < 1 and row.num_traps == 0 and row.rand_bulk_max == pytest.approx(0.0115346, rel=1e-5)


def test_randomize_finds_the_trap_of_a_layer_of_one_entry():
    w = torch.zeros(30, 12)
    w[3, 4] = 2.0  # rank 1 however shuffled: all eigenvalues but the last are 0
    row = analyze({"o.weight": w}, randomize=True).layers[0]
    assert row.num_traps == 1
    assert row.traps == ({"eigenvalue": 4.0, "entries": [{"slice": 0, "row": 3, "col": 4, "value": 2.0}]},)


def test_randomize_leaves_a_single_eigenvalue_unfitted():
    torch.manual_seed(0)
    row = analyze({"c.weight": torch.randn(40, 1)}, randomize=True).layers[0]
    assert row.rand_lambda_max == pytest.approx(row.lambda_max, rel=1e-12)  # one eigenvalue: the squared norm
    assert math.isnan(row.rand_bulk_max) and row.num_traps is None


def test_randomize_finds_a_trap_among_small_entries():
    torch.manual_seed(0)
    w = 1e-3 * torch.randn(200, 100)
    w[5, 7] = 0.045  # σ² ≈ 2e-3: four times the bulk edge, though σ < 1
    row = analyze({"p.weight": w}, randomize=True, seed=0).layers[0]
    assert row.num_traps == 1 and [e["value"] for e in row.traps[0]["entries"]] == [pytest.approx(0.045)]


def test_randomize_lists_at_most_ten_traps_and_counts_them_all():
    from tbdiag.esd.randomize import MAX_TRAPS

    torch.manual_seed(0)
    w = torch.randn(400, 200)
    for i in range(12):
        w[30 * i + 3, 15 * i + 2] = 80.0 + i
    row = analyze({"q.weight": w}, randomize=True, seed=0).layers[0]
    assert row.num_traps == 11 and len(row.traps) == MAX_TRAPS == 10
    assert row.traps[0]["entries"][0]["value"] == 91.0  # the largest eigenvalue first: the largest entry


def test_randomize_computes_the_shuffled_esd_at_the_chosen_precision():
    torch.manual_seed(0)
    w = {"f.weight": torch.randn(60, 30)}
    in_float32 = analyze(w, randomize=True, precision="float32", keep_spectra=True).rand_spectra["f"]
    in_float64 = analyze(w, randomize=True, keep_spectra=True).rand_spectra["f"]
    relative = abs(in_float32 / in_float64 - 1).max()
    assert 0 < relative < 1e-4  # the same shuffle, solved in float32


def _fc_adapter_and_base(tmp_path):
    """An adapter on fc (s = 1/2), its base weights, and both factors."""
    from safetensors.torch import save_file

    torch.manual_seed(5)
    a, b = torch.randn(2, 8), torch.randn(16, 2)
    folder = _adapter(tmp_path / "ad", {"fc.lora_A.weight": a, "fc.lora_B.weight": b}, lora_alpha=1)
    base = {"fc.weight": torch.randn(16, 8)}
    save_file(base, tmp_path / "base.safetensors")
    return folder, tmp_path / "base.safetensors", a, b, base


def test_adapter_specs_merge_by_default_only_with_a_base_and_keep_the_layer(tmp_path):
    from tbdiag.esd.layers import LayerSpec, plan_layers
    from tbdiag.finetune.lora import LowRankSpec, adapter_specs, open_adapter
    from tbdiag.io.checkpoint import open_checkpoint

    folder, base_path, a, b, base = _fc_adapter_and_base(tmp_path)
    adapter = open_adapter(folder)
    base_specs = plan_layers(open_checkpoint(base_path), include_embeddings=True)[0]
    delta = 0.5 * b.double() @ a.double()
    (merged,), _ = adapter_specs(adapter, base_specs)
    assert type(merged) is LayerSpec and (merged.name, merged.kind, merged.shape, merged.tensor) == (
        "fc", "linear", (16, 8), "fc")
    assert torch.allclose(merged.ref.load(), base["fc.weight"] + delta.float(), rtol=1e-6, atol=1e-7)
    (low,), _ = adapter_specs(adapter, None)  # no base: the update alone, low rank
    assert type(low) is LowRankSpec and (low.name, low.kind, low.shape, low.tensor) == ("fc", "linear", (16, 8), "fc")
    assert low.layer is adapter.layers[0] and low.n_evals == 2
    assert (low.ref.name, tuple(low.ref.shape), low.ref.dtype) == ("fc", (16, 8), torch.float64)
    assert torch.allclose(low.ref.load().double(), delta, rtol=1e-6, atol=1e-7)
    with pytest.raises(TbdiagError) as info:
        adapter_specs(adapter, None, merge=True)
    assert str(info.value) == f"{folder}: merging the adapter needs the base model's weights"


def test_adapter_head_missing_from_the_base_is_logged_as_tied_to_the_embedding(tmp_path, caplog):
    import logging

    from safetensors.torch import save_file

    folder = _adapter(tmp_path / "ad", _pair("lm_head", (2, 16), (96, 2)))
    torch.manual_seed(6)
    save_file({"embed_tokens.weight": torch.randn(96, 16)}, tmp_path / "base.safetensors")
    with caplog.at_level(logging.INFO, logger="tbdiag.finetune.lora"):
        m = analyze(folder, base=tmp_path / "base.safetensors", view="merged")
    assert [r.name for r in m.layers] == ["lm_head"]
    assert [r.getMessage() for r in caplog.records if r.name == "tbdiag.finetune.lora"] == [
        "lm_head: not in the base; taken as tied to embed_tokens (same shape, saved once)"]
