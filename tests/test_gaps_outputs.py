"""Tests written against surviving mutants of benchmarks/mutation.sh (outputs modules): each checks a value a planted bug changes."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from functools import lru_cache
from pathlib import Path

import pytest

import tbdiag
from tbdiag.allocation import allocators
from tbdiag.allocation.maps import unit_multipliers
from tbdiag.allocation.recommend import allocation, recommend
from tbdiag.errors import TbdiagError
from tests.test_prune import llama_state

# --- allocation/recommend.py --------------------------------------------------------------------------------------

TUNED = [f"model.layers.{b}.{m}" for b in range(3)
         for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@lru_cache(maxsize=1)
def llama() -> tbdiag.Analysis:
    """Three LLaMA blocks: 15 layers tuned (k/v have 32 eigenvalues, the embedding and lm_head are left out)."""
    return tbdiag.analyze(llama_state())


def alphas_of(names):
    rows = {r.name: r for r in llama().layers}
    return [rows[n].alpha for n in names]


def sizes_of(names):
    rows = {r.name: r for r in llama().layers}
    return [math.prod(rows[n].shape) for n in names]


def test_a_weight_decay_allocation_records_every_unit_by_hand():
    doc = allocation(llama(), "weight_decay", weight_decay=0.05, map="sqrt", min_ratio=0.5, max_ratio=1.5)
    mult = unit_multipliers(TUNED, alphas_of(TUNED), "sqrt", 0.5, 1.5)
    assert {k: v for k, v in doc.items() if k != "layers"} == {
        "schema": "tbdiag.allocation/v1", "source": "<state dict>", "target": "weight_decay", "unit": "layer",
        "fit": "ks", "parameters": {"weight_decay": 0.05, "map": "sqrt", "min_ratio": 0.5, "max_ratio": 1.5}}
    assert doc["layers"] == {n: {"alpha": a, "layers": [n], "n_params": s, "multiplier": mult[n],
                                 "weight_decay": 0.05 * mult[n]}
                             for n, a, s in zip(TUNED, alphas_of(TUNED), sizes_of(TUNED))}


def test_weight_decay_defaults_are_linear_between_half_and_one_and_a_half():
    plain = allocation(llama(), "weight_decay")["layers"]
    assert all("weight_decay" not in g for g in plain.values())
    assert {u: g["multiplier"] for u, g in plain.items()} == unit_multipliers(TUNED, alphas_of(TUNED), "linear", 0.5, 1.5)
    wide = allocation(llama(), "weight_decay", min_ratio=0.2, max_ratio=3.0, weight_decay=0.0)["layers"]
    assert min(g["multiplier"] for g in wide.values()) == pytest.approx(0.2)
    assert max(g["multiplier"] for g in wide.values()) == pytest.approx(3.0)
    assert {g["weight_decay"] for g in wide.values()} == {0.0}


def test_a_block_unit_groups_its_layers_sizes_and_mean_alpha():
    doc = allocation(llama(), "weight_decay", unit="block")
    assert list(doc["layers"]) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    block = doc["layers"]["model.layers.1"]
    names = TUNED[5:10]
    assert block["layers"] == names and block["n_params"] == sum(sizes_of(names))
    assert block["alpha"] == pytest.approx(sum(alphas_of(names)) / 5, rel=1e-15)


def test_a_sparsity_allocation_is_alphapruning_with_its_parameters():
    doc = allocation(llama(), "sparsity", sparsity=0.5)
    want = allocators.sparsity(alphas_of(TUNED), sizes_of(TUNED), 0.5, 0.3, 0.99)
    assert [g["sparsity"] for g in doc["layers"].values()] == want
    tight = allocation(llama(), "sparsity", sparsity=0.5, epsilon=0.9, max_sparsity=0.6)
    assert [g["sparsity"] for g in tight["layers"].values()] == allocators.sparsity(
        alphas_of(TUNED), sizes_of(TUNED), 0.5, 0.9, 0.6)
    assert max(g["sparsity"] for g in tight["layers"].values()) == pytest.approx(0.6)


def test_lora_ranks_and_their_peft_arguments():
    doc = allocation(llama(), "lora_rank", budget=45, beta=2.0, r_min=2, r_max=5.0, lora_alpha=16.0)
    ranks = allocators.lora_ranks(alphas_of(TUNED), 45, 2.0, 2, 5)
    assert [g["rank"] for g in doc["layers"].values()] == ranks and sum(ranks) == 45 and max(ranks) == 5
    assert doc["peft"] == {
        "r": 3, "target_modules": "^(" + "|".join(re.escape(n) for n in sorted(TUNED)) + ")$",
        "rank_pattern": {f"^{re.escape(n)}$": r for n, r in zip(TUNED, ranks)},
        "lora_alpha": 16.0, "alpha_pattern": {f"^{re.escape(n)}$": 16.0 * r / 3 for n, r in zip(TUNED, ranks)}}
    plain = allocation(llama(), "lora_rank", budget=40)
    assert [g["rank"] for g in plain["layers"].values()] == allocators.lora_ranks(alphas_of(TUNED), 40, 1.0, 1, None)
    assert "lora_alpha" not in plain["peft"] and plain["peft"]["r"] == round(40 / 15)


@pytest.mark.parametrize("call, message", [
    (lambda: allocation(llama(), "lr"), "target 'lr': use one of weight_decay, sparsity, lora_rank (lr: recommend)"),
    (lambda: allocation(llama(), "lora_rank", unit="block", budget=40), "LoRA ranks are per module: use unit layer"),
    (lambda: allocation(llama(), "weight_decay", weight_decay=-0.1),
     "weight_decay -0.1: must be a finite number ≥ 0; e.g. 0.05"),
    (lambda: allocation(llama(), "weight_decay", weight_decay=math.inf),
     "weight_decay inf: must be a finite number ≥ 0; e.g. 0.05"),
    (lambda: allocation(llama(), "sparsity", sparsity=0.5, include=("zzz",), exclude=("q_proj",)),
     "<state dict>: no layer to allocate to with include 'zzz', exclude 'q_proj' among its 22 layers "
     "(model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj …); "
     "check the patterns"),
    (lambda: allocation(llama(), "sparsity", sparsity=0.5, min_evals=1000),
     "<state dict>: no layer to allocate to (Conv/Linear with ≥ 1000 eigenvalues, input and output layers "
     "excluded); include the first and last layers or lower the eigenvalue minimum"),
    (lambda: recommend(llama(), min_evals=1000, include_first_last=True),
     "<state dict>: no layer to tune (Conv/Linear with ≥ 1000 eigenvalues); lower the eigenvalue minimum"),
    (lambda: recommend(llama(), metric="beta"), "metric 'beta': use one of alpha, alpha_weighted, spectral_norm"),
])
def test_allocation_and_recommend_refusals_say_what_and_how(call, message):
    with pytest.raises(TbdiagError) as err:
        call()
    assert str(err.value) == message


def test_refusals_name_the_cli_flags_of_their_parameters():
    with pytest.raises(TbdiagError) as err:
        allocation(llama(), "weight_decay", weight_decay=-1.0)
    assert err.value.cli_message() == "--weight-decay -1.0: must be a finite number ≥ 0; e.g. 0.05"
    with pytest.raises(TbdiagError) as err:
        recommend(llama(), include=("zzz",), exclude=("q_proj",))
    assert "no layer to tune with --include 'zzz', --exclude 'q_proj' among" in err.value.cli_message()
    with pytest.raises(TbdiagError) as err:
        recommend(llama(), min_evals=1000)
    assert err.value.cli_message().endswith("; --include-first-last or lower --min-evals")


def test_a_multipliers_document_by_hand():
    doc = recommend(llama(), metric="alpha_weighted", map="linear", min_ratio=0.5, max_ratio=1.5, lr=0.1)
    rows = {r.name: r for r in llama().layers}
    values = [rows[n].alpha_weighted for n in TUNED]
    mult = unit_multipliers(TUNED, values, "linear", 0.5, 1.5)
    assert {k: v for k, v in doc.items() if k != "layers"} == {
        "schema": "tbdiag.multipliers/v1", "source": "<state dict>", "metric": "alpha_weighted", "map": "linear",
        "min_ratio": 0.5, "max_ratio": 1.5, "unit": "layer", "fit": "ks", "lr": 0.1, "default_multiplier": 1.0}
    assert doc["layers"] == {n: {"alpha": rows[n].alpha, "value": v, "multiplier": mult[n], "layers": [n],
                                 "lr": 0.1 * mult[n]} for n, v in zip(TUNED, values)}
    assert all("lr" not in e for e in recommend(llama())["layers"].values())


def test_embeddings_of_an_analysis_are_never_tuned_nor_allocated():
    analysis = tbdiag.analyze(llama_state(), include_embeddings=True)
    assert "model.embed_tokens" in [r.name for r in analysis.layers]
    assert "model.embed_tokens" not in recommend(analysis, include_first_last=True)["layers"]
    assert "model.embed_tokens" not in allocation(analysis, "weight_decay", include_first_last=True)["layers"]
    assert "lm_head" in recommend(analysis, include_first_last=True)["layers"]


def test_a_unit_without_a_finite_alpha_is_written_as_null():
    rows = tuple(dataclasses.replace(r, alpha=math.nan) if r.name == TUNED[0] else r for r in llama().layers)
    analysis = dataclasses.replace(llama(), layers=rows)
    assert recommend(analysis)["layers"][TUNED[0]]["alpha"] is None
    assert allocation(analysis, "weight_decay")["layers"][TUNED[0]]["alpha"] is None
    assert recommend(analysis)["layers"][TUNED[1]]["alpha"] == alphas_of([TUNED[1]])[0]


HINT = "write one with tbdiag recommend"


@pytest.mark.parametrize("doc, message", [
    ([1, 2], "schema is 'list', not tbdiag.multipliers/v1; " + HINT),
    ({"schema": "x" * 50}, "schema is '" + "x" * 40 + "', not tbdiag.multipliers/v1; " + HINT),
    ({"layers": {}}, "schema is 'None', not tbdiag.multipliers/v1; " + HINT),
    ({"schema": "tbdiag.allocation/v1", "target": "sparsity", "layers": {}},
     "schema is 'tbdiag.allocation/v1', not tbdiag.multipliers/v1; " + HINT),
    ({"schema": "tbdiag.multipliers/v1", "layers": [1]}, "'layers' is a list, not an object of groups; " + HINT),
    ({"schema": "tbdiag.multipliers/v1", "layers": {"fc": 2.0}}, "multiplier of 'fc' is 'None', not a positive number; " + HINT),
    ({"schema": "tbdiag.multipliers/v1", "layers": {"f" * 90: {"multiplier": -1}}},
     f"multiplier of {'f' * 80!r} is '-1', not a positive number; " + HINT),
    ({"schema": "tbdiag.multipliers/v1", "layers": {"fc": {"multiplier": "9" * 50}}},
     f"multiplier of 'fc' is {'9' * 40!r}, not a positive number; " + HINT),
    ({"schema": "tbdiag.multipliers/v1", "layers": {"fc": {"multiplier": 0}}},
     "multiplier of 'fc' is '0', not a positive number; " + HINT),
    ({"schema": "tbdiag.multipliers/v1", "layers": {"fc": {"multiplier": True}}},
     "multiplier of 'fc' is 'True', not a positive number; " + HINT),
    ({"schema": "tbdiag.multipliers/v1", "layers": {"fc": {"multiplier": 10 ** 400}}},
     "multiplier of 'fc' is '" + "1" + "0" * 39 + "', not a positive number; " + HINT),
])
def test_a_multipliers_file_that_cannot_be_loaded_is_refused_by_field(tmp_path, doc, message):
    from tbdiag.allocation.recommend import load_multipliers

    path = tmp_path / "m.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(TbdiagError) as err:
        load_multipliers(path)
    assert str(err.value) == f"{path}: {message}"


def test_multipliers_load_from_a_recommendation_and_from_a_weight_decay_allocation(tmp_path):
    from tbdiag.allocation.recommend import load_multipliers

    (tmp_path / "m.json").write_text(json.dumps(recommend(llama())))
    (tmp_path / "wd.json").write_text(json.dumps(allocation(llama(), "weight_decay", min_ratio=0.2)))
    assert load_multipliers(tmp_path / "m.json") == {u: e["multiplier"] for u, e in recommend(llama())["layers"].items()}
    wd = allocation(llama(), "weight_decay", min_ratio=0.2)["layers"]
    assert load_multipliers(tmp_path / "wd.json") == {u: g["multiplier"] for u, g in wd.items()}
    with pytest.raises(TbdiagError, match=f"^{re.escape(str(tmp_path / 'no.json'))}: no such file; {HINT}$"):
        load_multipliers(tmp_path / "no.json")


# --- analysis/export.py ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def randomized() -> tbdiag.Analysis:
    """Three layers, the middle one with a planted entry: one correlation trap with one entry."""
    import torch

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    w[3, 5] = 40.0
    state = {"a.weight": torch.randn(64, 64, generator=g), "b.weight": w, "c.weight": torch.randn(10, 64, generator=g)}
    return tbdiag.analyze(state, randomize=True)


def test_traps_are_read_back_exactly_and_left_out_of_the_csv():
    from tbdiag.analysis.export import analysis_from_dict, to_csv, to_json

    doc = json.loads(to_json([randomized()]))
    assert doc["layers"][1]["traps"] == [{"eigenvalue": randomized().layers[1].traps[0]["eigenvalue"],
                                          "entries": [{"slice": 0, "row": 3, "col": 5, "value": 40.0}]}]
    back = analysis_from_dict(doc)
    assert back.layers == randomized().layers and back.layers[1].traps[0]["entries"][0]["row"] == 3
    del doc["layers"][1]["traps"][0]["entries"][0]["slice"]  # optional: slice 0
    del doc["layers"][0]["traps"]  # optional: none (older files)
    again = analysis_from_dict(doc)
    assert again.layers[1].traps == randomized().layers[1].traps and again.layers[0].traps == ()
    text = to_csv([randomized()])
    assert "\r" not in text and text.count("\n") == 4 and "traps" not in text.splitlines()[0].split(",")
    assert "entries" not in text and text.splitlines()[0].endswith(",num_traps")


def test_a_csv_cell_of_nan_is_empty():
    import csv

    from tbdiag.analysis.export import to_csv

    rows = tuple(dataclasses.replace(r, alpha=math.nan) if r.name == "b" else r for r in randomized().layers)
    table = list(csv.DictReader(to_csv([dataclasses.replace(randomized(), layers=rows)]).splitlines()))
    assert [r["alpha"] for r in table][1] == "" and table[0]["alpha"] == repr(rows[0].alpha)
    assert table[1]["shape"] == "64x96" and table[1]["source"] == "<state dict>"


DAMAGED = "the file is damaged or not written by tbdiag: analyse the checkpoint again"


def _damage(edit):
    """The randomized analysis' JSON document, edited in place by ``edit``."""
    from tbdiag.analysis.export import to_json

    doc = json.loads(to_json([randomized()]))
    edit(doc)
    return doc


def ascii_locale_env() -> dict[str, str]:
    """The environment of a subprocess under an ASCII locale, importing this tbdiag (the one under test, e.g. a
    mutation run's copy), not another installed one."""
    import os

    return {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
            "PYTHONPATH": str(Path(tbdiag.__file__).resolve().parents[1])}


def _refusal(edit) -> str:
    """The one-line refusal of the randomized analysis' document damaged by ``edit``, read as ``run.json``."""
    from tbdiag.analysis.export import analysis_from_dict

    with pytest.raises(TbdiagError) as err:
        analysis_from_dict(_damage(edit), "run.json")
    return str(err.value)


def _trap(doc):
    return doc["layers"][1]["traps"][0]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layers"][1].update(traps="x"), 'layers[1].traps is "x", not a list'),
    (lambda d: d["layers"][1].update(traps=[3]), "layers[1].traps[0] is 3, not an object"),
    (lambda d: _trap(d).pop("entries"), "layers[1].traps[0].entries is missing, not a list"),
    (lambda d: _trap(d).update(entries=[[]]), "layers[1].traps[0].entries[0] is [], not an object"),
    (lambda d: _trap(d)["entries"][0].update(row=-1), "layers[1].traps[0].entries[0].row is -1, not a whole number ≥ 0"),
    (lambda d: _trap(d)["entries"][0].pop("col"), "layers[1].traps[0].entries[0].col is missing, not a whole number ≥ 0"),
    (lambda d: _trap(d)["entries"][0].update(slice=1.5),
     "layers[1].traps[0].entries[0].slice is 1.5, not a whole number ≥ 0"),
    (lambda d: _trap(d)["entries"][0].update(value=None), "layers[1].traps[0].entries[0].value is null, not a number"),
    (lambda d: _trap(d).update(eigenvalue="x"), 'layers[1].traps[0].eigenvalue is "x", not a number or null'),
    (lambda d: d["layers"][0].update(name=7 * 10 ** 49), "layers[0].name is " + "7" + "0" * 39 + ", not a string"),
])
def test_damaged_traps_and_fields_are_named_word_for_word(edit, message):
    assert _refusal(edit) == f"run.json: {message}; {DAMAGED}"


def test_a_null_trap_eigenvalue_reads_as_nan():
    from tbdiag.analysis.export import analysis_from_dict

    back = analysis_from_dict(_damage(lambda d: _trap(d).update(eigenvalue=None)))
    assert math.isnan(back.layers[1].traps[0]["eigenvalue"])


# --- report/recommended.py ------------------------------------------------------------------------------------------


def test_a_page_of_ks_alphas_shows_the_multipliers_recommend_gives_refitted_with_median():
    from tbdiag.analysis.export import jsonable
    from tbdiag.report.recommended import multipliers_view

    page = tbdiag.analyze(llama_state(), keep_spectra=True)  # ks, the default fit
    view = multipliers_view(page)
    assert view == {"multipliers": jsonable(recommend(tbdiag.analyze(llama_state(), fit="median"))), "same": True,
                    "note": "refitted with median from the eigenvalues of this page (its alphas are ks)"}


def test_a_saved_ks_analysis_shows_its_own_fits_multipliers_and_says_so(tmp_path):
    from tbdiag.analysis.export import jsonable, read_analyses, to_json
    from tbdiag.report.recommended import multipliers_view

    (tmp_path / "a.json").write_text(to_json([llama()]))
    saved_page = read_analyses(tmp_path / "a.json")[0]
    view = multipliers_view(saved_page)
    assert view["multipliers"] == jsonable(recommend(saved_page)) and view["same"] is False
    assert view["note"] == ("from this analysis' ks fit, NOT the numbers tbdiag recommend gives: it fits median, and a "
                            "saved analysis keeps no eigenvalues to refit; run tbdiag recommend on the checkpoint for those")


def test_a_median_page_with_other_options_names_them():
    from tbdiag.report.recommended import differences, multipliers_view

    page = tbdiag.analyze(llama_state(), fit="median", min_evals=20, xmin_pos=3.0)
    assert differences(page) == ["xmin_pos 3.0 (recommend: 2.0)", "min_evals 20 (recommend: 10)"]
    view = multipliers_view(page)
    assert view["same"] is False and view["note"] == (
        "from this analysis' median fit; this analysis also used xmin_pos 3.0 (recommend: 2.0), min_evals 20 "
        "(recommend: 10), so tbdiag recommend's numbers differ")
    plain = multipliers_view(tbdiag.analyze(llama_state(), fit="median"))
    assert plain["same"] is True and plain["note"] == "from this analysis' median fit"


def test_a_page_without_a_layer_to_tune_shows_why():
    from tbdiag.report.recommended import multipliers_view

    import torch

    page = tbdiag.analyze({"a.weight": torch.randn(64, 64), "b.weight": torch.randn(64, 64)}, fit="median")
    view = multipliers_view(page)
    assert view == {"multipliers": None, "same": False, "note": (
        "<state dict>: no layer to tune (Conv/Linear with ≥ 50 eigenvalues, input and output layers excluded); "
        "include the first and last layers or lower the eigenvalue minimum")}


def test_a_refit_keeps_each_layers_warning_the_skipped_layers_and_the_precision():
    from tbdiag.analysis.export import jsonable
    from tbdiag.report.recommended import refit

    state = llama_state()
    state["model.layers.1.mlp.up_proj.weight"][:, :8] = 0  # rank-deficient: zero eigenvalues and a warning
    options = dict(precision="float32", xmin_pos=3.0, min_evals=40)  # k/v (32 eigenvalues) not fitted
    page = tbdiag.analyze(state, keep_spectra=True, **options)
    again = refit(page, "median")
    direct = tbdiag.analyze(state, fit="median", **options)
    assert math.isnan(again.layers[1].alpha) and math.isfinite(again.layers[0].alpha)
    as_json = lambda a: [jsonable(dataclasses.asdict(r)) for r in a.layers]  # noqa: E731 - nan == nan
    assert as_json(again) == as_json(direct) and again.options == direct.options
    assert any(r.warning for r in again.layers)
    assert again.summary == direct.summary
    assert refit(dataclasses.replace(page, spectra={}), "median") is None


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layers"][0].update(alpha=10 ** 400), "layers[0].alpha is " + "1" + "0" * 39 + ", not a number within float range"),
    (lambda d: d["layers"][0].update(n_evals=None), "layers[0].n_evals is null, not a whole number ≥ 0"),
    (lambda d: d["layers"][0].update(n_tail="x"), 'layers[0].n_tail is "x", not a whole number ≥ 0 or null'),
    (lambda d: d.update(n_params=-1), "n_params is -1, not a whole number ≥ 0 or null"),
    (lambda d: d["layers"][0].update(num_spikes=-1), "layers[0].num_spikes is -1, not a whole number ≥ 0"),
    (lambda d: d["layers"][0].update(warning=5), "layers[0].warning is 5, not a string or null"),
    (lambda d: d["layers"][0].update(name=None), "layers[0].name is null, not a string"),
    (lambda d: d["options"].update(randomize="yes"), 'options.randomize is "yes", not true or false'),
    (lambda d: _trap(d)["entries"][0].pop("row"), "layers[1].traps[0].entries[0].row is missing, not a whole number ≥ 0"),
    (lambda d: _trap(d)["entries"][0].pop("value"), "layers[1].traps[0].entries[0].value is missing, not a number"),
    (lambda d: _trap(d).pop("eigenvalue"), "layers[1].traps[0].eigenvalue is missing, not a number or null"),
])
def test_damaged_fields_are_named_with_what_they_may_hold(edit, message):
    assert _refusal(edit) == f"run.json: {message}; {DAMAGED}"


def test_optional_and_null_fields_read_as_their_documented_defaults():
    from tbdiag.analysis.export import analysis_from_dict

    def edit(d):
        first, second, third = d["layers"]
        first.update(warning="kept as written", n_tail=None, alpha=math.inf)
        del first["alpha_err"]
        second.pop("warning")
        del second["n_tail"]
        third.update(warning=None)
        d["n_params"] = None

    back = analysis_from_dict(_damage(edit))
    first, second, third = back.layers
    assert first.warning == "kept as written" and first.n_tail == 0 and math.isnan(first.alpha)
    assert math.isnan(first.alpha_err) and second.warning == "" and second.n_tail == 0 and third.warning == ""
    assert back.n_params == 0


def test_every_option_type_has_a_check_and_every_option_reads_back():
    from tbdiag.analysis.export import _OPTION_TYPES, analysis_from_dict, to_json
    from tbdiag.analysis.options import AnalyzeOptions

    assert {f.type for f in AnalyzeOptions.__dataclass_fields__.values()} <= set(_OPTION_TYPES)
    page = tbdiag.analyze(llama_state(), fit="median", include=("*mlp*",), key=None, xmin_pos=3.0, peak_bins=50)
    back = analysis_from_dict(json.loads(to_json([page])))
    assert back.options == page.options and back.options.include == ("*mlp*",)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["options"].update(min_evals="x"), 'options.min_evals is "x", not a whole number ≥ 0'),
    (lambda d: d["options"].update(key=5), "options.key is 5, not a string"),
    (lambda d: d["options"].update(include=["a", 3]), "options.include[1] is 3, not a string"),
    (lambda d: d["options"].update(exclude="a"), 'options.exclude is "a", not a list'),
    (lambda d: d["options"].update(xmin_pos=None), "options.xmin_pos is null, not a number"),
    (lambda d: d["options"].update(precision=3), "options.precision is 3, not a string"),
    (lambda d: d.pop("options"), "options is missing, not an object"),
])
def test_damaged_options_are_named_word_for_word(edit, message):
    assert _refusal(edit) == f"run.json: {message}; {DAMAGED}"


def test_options_that_describe_no_analysis_say_why():
    from tbdiag.analysis.export import analysis_from_dict

    with pytest.raises(TbdiagError) as err:
        analysis_from_dict(_damage(lambda d: d["options"].update(precision="float8")), "run.json")
    assert str(err.value) == ("run.json: options do not describe an analysis (precision float8: use float64 or "
                              f"float32); {DAMAGED}")


def test_a_files_device_and_permissions_are_never_taken_and_absent_options_take_defaults():
    from tbdiag.analysis.export import analysis_from_dict

    def edit(d):
        d["options"].update(device="cuda:7", trust_pickle=True, key=None)
        del d["options"]["seed"], d["options"]["peak_bins"]

    options = analysis_from_dict(_damage(edit)).options
    assert options.device == "auto" and options.trust_pickle is False and options.key is None
    assert options.seed == 0 and options.peak_bins == 100 and options.randomize is True


@pytest.mark.parametrize("doc, found", [({"schema": "other/v9"}, "'other/v9'"), ([1], "'list'"), ({}, "None")])
def test_a_document_of_another_schema_is_named(doc, found):
    from tbdiag.analysis.export import analysis_from_dict

    with pytest.raises(TbdiagError) as err:
        analysis_from_dict(doc)
    assert str(err.value) == (f"<json>: schema is {found}, not tbdiag.analysis/v1; pass an analysis JSON written "
                              "by tbdiag")


def test_the_skipped_layers_of_a_saved_summary_are_kept_and_a_malformed_one_dropped():
    from tbdiag.analysis.export import analysis_from_dict

    kept = analysis_from_dict(_damage(lambda d: d["summary"].update(skipped={"embed": "embedding"})))
    assert kept.summary["skipped"] == {"embed": "embedding"}
    assert analysis_from_dict(_damage(lambda d: d["summary"].update(skipped=[1]))).summary["skipped"] == {}
    assert analysis_from_dict(_damage(lambda d: d.update(summary=3))).summary["skipped"] == {}
    assert analysis_from_dict(_damage(lambda d: d["summary"].pop("skipped", None))).summary["skipped"] == {}


def test_the_view_of_a_document_is_checked_and_weights_when_absent():
    from tbdiag.analysis.core import VIEWS
    from tbdiag.analysis.export import analysis_from_dict

    assert analysis_from_dict(_damage(lambda d: d.pop("view"))).view == "weights"
    for view, shown, expected in ((3, "3", "a string"), ("x", '"x"', f"one of {', '.join(VIEWS)}")):
        with pytest.raises(TbdiagError) as err:
            analysis_from_dict(_damage(lambda d: d.update(view=view)), "run.json")
        assert str(err.value) == f"run.json: view is {shown}, not {expected}; {DAMAGED}"


def test_a_documents_top_level_fields_read_back_with_their_defaults():
    from tbdiag.analysis.export import analysis_from_dict

    back = analysis_from_dict(_damage(lambda d: d.update(base="base.safetensors", view="delta", format="safetensors")))
    assert (back.base, back.view, back.format) == ("base.safetensors", "delta", "safetensors")
    assert back.n_params == randomized().n_params and back.timing == json.loads(json.dumps(randomized().timing))
    bare = analysis_from_dict(_damage(lambda d: [d.pop(k) for k in ("base", "format", "n_params", "timing")]))
    assert (bare.base, bare.format, bare.n_params, bare.timing) == (None, "?", 0, {})


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(base=3), "base is 3, not a string"),
    (lambda d: d.update(format=3), "format is 3, not a string"),
    (lambda d: d.update(timing=[1]), "timing is [1], not an object"),
    (lambda d: d.pop("source"), "source is missing, not a string"),
])
def test_damaged_top_level_fields_are_named(edit, message):
    assert _refusal(edit) == f"run.json: {message}; {DAMAGED}"


def test_an_analysis_json_has_one_line_per_top_level_key_and_per_layer_and_never_nan():
    from tbdiag.analysis.export import _dump, to_json

    lines = to_json([randomized()]).splitlines()
    assert lines[0] == "{" and lines[-1] == "}" and lines[1].startswith(' "schema": ')
    assert sum(line.startswith('  {"name": ') for line in lines) == 3
    assert ' "layers": [' in lines and " ]," in lines
    assert len(lines) == 2 + 3 + 2 + (len(json.loads("\n".join(lines))) - 1)
    for doc in ({"x": math.nan}, {"layers": [{"alpha": math.inf}]}):
        with pytest.raises(ValueError):
            _dump(doc)


def test_read_json_names_why_a_file_is_not_json(tmp_path, monkeypatch):
    from tbdiag.analysis.export import read_analyses, read_json

    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(TbdiagError) as err:
        read_json(tmp_path / "bad.json", "do this")
    assert str(err.value) == (f"{tmp_path / 'bad.json'}: not a JSON file (Expecting property name enclosed in double "
                              "quotes: line 1 column 2 (char 1)); do this")
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: (_ for _ in ()).throw(OSError()))
    with pytest.raises(TbdiagError) as err:
        read_json(tmp_path / "bad.json", "do this")
    assert str(err.value) == f"{tmp_path / 'bad.json'}: not a JSON file (OSError); do this"
    monkeypatch.undo()
    doc = _damage(lambda d: None)
    (tmp_path / "two.json").write_text(json.dumps([doc, {"schema": "x"}]), encoding="utf-8")
    with pytest.raises(TbdiagError) as err:
        read_analyses(tmp_path / "two.json")
    assert str(err.value) == (f"{tmp_path / 'two.json'}[1]: schema is 'x', not tbdiag.analysis/v1; pass an analysis "
                              "JSON written by tbdiag")
    with pytest.raises(TbdiagError) as err:
        read_analyses(tmp_path / "none.json")
    assert str(err.value) == f"{tmp_path / 'none.json'}: no such file; pass an analysis JSON written by tbdiag"


def test_an_analysis_json_is_read_as_utf8_here_and_under_an_ascii_locale(tmp_path):
    import subprocess
    import sys

    from tbdiag.analysis.export import read_analyses, to_json

    page = dataclasses.replace(randomized(), source="modèle.safetensors")
    text = to_json([page]).replace("\\u00e8", "è")  # tbdiag writes ASCII; an edited file may hold UTF-8
    assert "modèle" in text
    (tmp_path / "a.json").write_text(text, encoding="utf-8")
    code = "import sys; from tbdiag.analysis.export import read_analyses; print(ascii(read_analyses(sys.argv[1])[0].source))"
    env = ascii_locale_env()
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.json")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ascii("modèle.safetensors")
    assert read_analyses(tmp_path / "a.json")[0].source == "modèle.safetensors"  # in this process too


# --- io/outputs.py ----------------------------------------------------------------------------------------------------


def test_an_existing_weights_file_with_an_upper_case_suffix_is_a_checkpoint_whatever_it_holds(tmp_path):
    from tbdiag.io.outputs import check_outputs

    victim = tmp_path / "notes.PT"
    victim.write_text("not weights at all")
    with pytest.raises(TbdiagError, match="is an existing checkpoint"):
        check_outputs([victim], weights=[victim])
    assert check_outputs([victim], weights=[victim], overwrite=True) == [victim.resolve()]
    (tmp_path / "plain.json").write_text("{}")
    assert check_outputs([tmp_path / "plain.json"]) == [(tmp_path / "plain.json").resolve()]


def test_a_missing_input_does_not_stop_the_check_of_the_next_one(tmp_path):
    from tbdiag.io.outputs import check_outputs

    real = tmp_path / "real.json"
    real.write_text("{}")
    with pytest.raises(TbdiagError, match=r"is the input"):
        check_outputs([real], [tmp_path / "missing.safetensors", real])


def test_a_file_two_folders_down_in_an_input_folder_is_found_through_a_hard_link(tmp_path, monkeypatch):
    import os

    from tbdiag.io.outputs import check_outputs

    folder = tmp_path / "model"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "0-unreadable").mkdir()
    deep = folder / "a" / "b" / "notes.txt"
    deep.write_text("x")
    link = tmp_path / "out.txt"
    os.link(deep, link)
    real = Path.iterdir

    def iterdir(self):  # in name order; the first subfolder cannot be listed: the others are still searched
        if self.name == "0-unreadable":
            raise PermissionError(13, "Permission denied")
        return iter(sorted(real(self)))

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(TbdiagError) as err:
        check_outputs([link], [folder])
    assert str(err.value) == (f"{link}: is the same file as {deep}, part of the input {folder}; write the output to "
                              "another file")


def test_a_writer_that_removed_its_temporary_keeps_its_own_error(tmp_path):
    from tbdiag.io.outputs import atomic_save

    def write(tmp):
        tmp.unlink()
        raise ValueError("the writer's own failure")

    with pytest.raises(ValueError, match="the writer's own failure"):
        atomic_save(tmp_path / "out.json", write)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("filename, where", [(None, "output"), ("/elsewhere/x", "/elsewhere/x"), ("temp", "a.json")])
def test_a_failed_write_names_the_output_it_was_writing(tmp_path, monkeypatch, filename, where):
    import tbdiag.io.outputs as outputs

    def fail(temps):
        name = str(temps[0][1]) if filename == "temp" else filename
        raise OSError(28, "No space left on device", name)

    monkeypatch.setattr(outputs, "replace_all", fail)
    with pytest.raises(TbdiagError) as err:
        outputs.write_outputs([(tmp_path / "a.json", "{}"), (tmp_path / "b.json", "{}")])
    where = str(tmp_path / "a.json") if filename == "temp" else where
    assert str(err.value) == (f"{where}: cannot write (No space left on device); nothing was written; check the disk "
                              "and the folder's permissions")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_restores_the_previous_content_where_hard_links_are_impossible(tmp_path, monkeypatch):
    import os

    import tbdiag.io.outputs as outputs

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text("old a")
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(1, "Operation not permitted")))
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(second):
            raise OSError(5, "Input/output error", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(TbdiagError):
        outputs.write_outputs([(first, "new a"), (second, "new b")])
    assert first.read_text() == "old a" and not second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_outputs_inside_an_input_folder_are_refused_word_for_word_after_a_file_input(tmp_path):
    from tbdiag.io.outputs import check_outputs

    single = tmp_path / "single.safetensors"
    single.write_bytes(b"x")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(TbdiagError) as err:
        check_outputs([folder / "config.json"], [single, folder], overwrite=True)
    assert str(err.value) == (f"{folder / 'config.json'}: is a file of the input folder {folder}, part of the input; "
                              "write the output outside that folder")
    with pytest.raises(TbdiagError) as err:
        check_outputs([folder / "new.json"], [single, folder])
    assert str(err.value) == (f"{folder / 'new.json'}: is inside the input folder {folder}, which reads files like it; "
                              "write the output outside that folder")
    assert check_outputs([folder / "report.html"], [single, folder]) == [(folder / "report.html").resolve()]


def test_a_refit_counts_as_zero_what_analyze_counts_for_the_layers_larger_side():
    """up_proj is 128 × 64: an eigenvalue of 100·ε·λ_max is below 128·ε·λ_max, a zero, as analyze counts it."""
    import numpy as np

    from tbdiag.report.recommended import refit

    page = tbdiag.analyze(llama_state(), keep_spectra=True)
    name = "model.layers.1.mlp.up_proj"
    tail = np.sort(np.random.default_rng(0).uniform(1.0, 100.0, 50))

    def alpha_with(smallest: float) -> float:
        spectrum = np.concatenate([np.zeros(13), [smallest * tail[-1]], tail])
        spectra = {**page.spectra, name: spectrum}
        row = {r.name: r for r in refit(dataclasses.replace(page, spectra=spectra), "median").layers}[name]
        return row.alpha

    eps = np.finfo(np.float64).eps
    assert alpha_with(100 * eps) == alpha_with(0.0)
    assert alpha_with(1000 * eps) != alpha_with(0.0)


@pytest.mark.parametrize("target, message", [
    ("", "an output path is empty; name a file"),
    ("  ", "an output path is empty; name a file"),
])
def test_an_empty_output_path_is_refused(target, message):
    from tbdiag.io.outputs import check_outputs

    with pytest.raises(TbdiagError) as err:
        check_outputs([target])
    assert str(err.value) == message


def test_check_outputs_refusals_name_the_target_as_given(tmp_path, monkeypatch):
    import os

    from tbdiag.io.outputs import check_outputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    os.mkfifo(tmp_path / "pipe.json")
    (tmp_path / "in.json").write_text("{}")
    (tmp_path / "old.safetensors").write_bytes(b"x")
    cases = [
        (["sub"], [], "sub: is a folder; name a file (e.g. sub/out)"),
        (["pipe.json"], [], "pipe.json: is not a regular file; name a regular file"),
        (["a.json", "./a.json"], [], "./a.json: names the same file as a.json; give each output its own file"),
        (["./in.json"], ["in.json"], "./in.json: is the input in.json; write the output to another file"),
        (["w.pt"], [], "w.pt: is named like a checkpoint (.pt) but would hold text; give it a .json, .csv or .html name"),
    ]
    for targets, inputs, message in cases:
        with pytest.raises(TbdiagError) as err:
            check_outputs(targets, inputs)
        assert str(err.value) == message
    with pytest.raises(TbdiagError) as err:
        check_outputs(["./old.safetensors"], weights=["./old.safetensors"])
    assert str(err.value) == ("./old.safetensors: is an existing checkpoint; write to another file, or allow "
                              "overwrite=True to replace it")


def test_an_output_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    import os

    from tbdiag.io.outputs import check_outputs

    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode & os.W_OK else real(path, mode))
    with pytest.raises(TbdiagError) as err:
        check_outputs([tmp_path / "a.json"])
    assert str(err.value) == f"{tmp_path / 'a.json'}: folder {tmp_path} is not writable; choose another path"


def test_a_temporary_is_a_hidden_file_beside_its_target_with_the_usual_mode(tmp_path):
    import os

    from tbdiag.io.outputs import temporary_beside

    tmp = temporary_beside(tmp_path / "out.json")
    assert tmp.parent == tmp_path and tmp.name.startswith(".out.json.") and tmp.name.endswith(".tmp")
    umask = os.umask(0)
    os.umask(umask)
    assert tmp.stat().st_mode & 0o777 == 0o666 & ~umask and tmp.stat().st_size == 0


def test_a_temporary_that_cannot_be_made_is_named(tmp_path, monkeypatch):
    import os
    import tempfile

    from tbdiag.io.outputs import temporary_beside

    with pytest.raises(TbdiagError) as err:
        temporary_beside(tmp_path / "missing" / "out.json")
    assert str(err.value) == (f"{tmp_path / 'missing' / 'out.json'}: folder {tmp_path / 'missing'} does not exist; "
                              "create it or choose another path")
    monkeypatch.setattr(tempfile, "mkstemp", lambda **k: (_ for _ in ()).throw(OSError(13, "Permission denied")))
    with pytest.raises(TbdiagError) as err:
        temporary_beside(tmp_path / "out.json")
    assert str(err.value) == f"{tmp_path / 'out.json'}: cannot write in {tmp_path} (Permission denied); choose another path"
    monkeypatch.undo()
    monkeypatch.setattr(os, "chmod", lambda *a: (_ for _ in ()).throw(PermissionError(1, "Operation not permitted")))
    with pytest.raises(PermissionError):
        temporary_beside(tmp_path / "out.json")
    assert list(tmp_path.iterdir()) == []


def test_text_outputs_are_utf8_with_their_own_line_ends_here_and_under_an_ascii_locale(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from tbdiag.io.outputs import atomic_write, write_outputs; "
            "atomic_write(sys.argv[1] + '/a.txt', 'mod\\u00e8le\\r\\nx\\n'); "
            "write_outputs([(sys.argv[1] + '/b.txt', '\\u00e9\\n')])")
    env = ascii_locale_env()
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.txt").read_bytes() == "modèle\r\nx\n".encode("utf-8")
    assert (tmp_path / "b.txt").read_bytes() == "é\n".encode("utf-8")
    from tbdiag.io.outputs import atomic_write, write_outputs

    atomic_write(tmp_path / "c.txt", "modèle\r\nx\n")  # in this process too
    write_outputs([(tmp_path / "d.txt", "é\n")])
    assert (tmp_path / "c.txt").read_bytes() == (tmp_path / "a.txt").read_bytes()
    assert (tmp_path / "d.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()


def test_stacked_experts_are_pruned_per_expert_but_decayed_and_adapted_per_stack():
    """Sparsity: one unit per expert, as prune allocates; weight decay and LoRA: the stack's module (a parent of
    the expert rows), which PEFT wraps."""
    from tests.test_prune_edges import moe_state

    moe = tbdiag.analyze(moe_state())
    stacks = [f"model.layers.{b}.mlp.experts.down_proj" for b in range(2)]
    experts = [f"{stacks[0]}.{e}" for e in range(4)]
    assert list(allocation(moe, "sparsity", sparsity=0.5)["layers"])[1:5] == experts
    assert list(allocation(moe, "weight_decay")["layers"]) == [
        "model.layers.0.self_attn.q_proj", stacks[0], "model.layers.1.self_attn.q_proj", stacks[1]]
    lora = allocation(moe, "lora_rank", budget=20)
    assert list(lora["peft"]["rank_pattern"])[1] == f"^{re.escape(stacks[0])}$"
    assert allocation(moe, "weight_decay")["layers"][stacks[0]]["layers"] == experts


def test_lora_ranks_for_top_level_layers():
    from tests.test_prune import mlp_state

    doc = allocation(tbdiag.analyze(mlp_state()), "lora_rank", budget=6)
    assert list(doc["peft"]["rank_pattern"]) == ["^fc1$", "^fc2$", "^fc3$"] and sum(doc["peft"]["rank_pattern"].values()) == 6


def test_a_block_unit_sparsity_allocation_has_one_sparsity_per_block():
    doc = allocation(llama(), "sparsity", sparsity=0.5, unit="block")
    assert list(doc["layers"]) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert doc["layers"]["model.layers.2"]["layers"] == TUNED[10:]


def test_a_refit_to_any_fit_equals_a_direct_analysis_and_keeps_the_pages_warnings():
    from tbdiag.analysis.export import jsonable
    from tbdiag.report.recommended import refit

    page = tbdiag.analyze(llama_state(), fit="median", keep_spectra=True)
    as_json = lambda a: [jsonable(dataclasses.asdict(r)) for r in a.layers]  # noqa: E731 - nan == nan
    again, direct = refit(page, "ks"), tbdiag.analyze(llama_state(), fit="ks")
    assert as_json(again) == as_json(direct) and jsonable(again.summary) == jsonable(direct.summary)
    noted = dataclasses.replace(page, layers=(dataclasses.replace(page.layers[0], warning="read from FP8"),
                                              *page.layers[1:]))
    assert refit(noted, "ks").layers[0].warning == "read from FP8"


def test_a_lora_rank_above_what_its_matrix_holds_is_refused():
    """The 15 tuned LLaMA layers are 64 × 64, 128 × 64 or 64 × 128: no LoRA update of theirs has rank above 64."""
    with pytest.raises(TbdiagError) as err:
        allocation(llama(), "lora_rank", budget=2000)
    assert re.fullmatch(r"<state dict>: LoRA rank \d+ for model\.layers\.\d\.[a-z_.]+ is above 64, the largest rank "
                        r"its matrix can hold; lower the budget, or cap every rank with r_max=64", str(err.value))
    assert err.value.cli_message().endswith("cap every rank with --r-max 64")
    ranks = [g["rank"] for g in allocation(llama(), "lora_rank", budget=960, r_max=64)["layers"].values()]
    assert ranks == [64] * 15  # every layer at its bound: the largest budget there is
    with pytest.raises(TbdiagError, match="is above 64"):
        allocation(llama(), "lora_rank", budget=961)


@pytest.mark.parametrize("bins", [0, 1_000_001, 10 ** 30])
def test_peak_bins_beyond_a_million_are_refused_before_any_work(bins):
    from tbdiag.analysis.export import analysis_from_dict
    from tbdiag.analysis.options import AnalyzeOptions

    with pytest.raises(TbdiagError, match=rf"^peak_bins {bins}: needs 1 to 1,000,000 bins \(the default is 100\)$"):
        AnalyzeOptions(fit="peak", peak_bins=bins)
    with pytest.raises(TbdiagError, match="options do not describe an analysis"):
        analysis_from_dict(_damage(lambda d: d["options"].update(peak_bins=bins)))
    assert AnalyzeOptions(fit="peak", peak_bins=1_000_000).peak_bins == 1_000_000


def test_the_cli_prints_its_tables_under_an_ascii_locale(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import save_file

    from tests.test_prune import mlp_state

    save_file(mlp_state(), tmp_path / "m.safetensors")
    env = ascii_locale_env()
    for args in (["analyze", str(tmp_path / "m.safetensors")],
                 ["diff", str(tmp_path / "m.safetensors"), str(tmp_path / "m.safetensors")]):
        done = subprocess.run([sys.executable, "-c", "from tbdiag.cli import app; app()", *args], env=env,
                              capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr.decode("ascii", "replace")
        assert b"fc2" in done.stdout and b"Traceback" not in done.stderr
