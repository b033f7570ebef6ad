"""What fine-tuning did: --randomize (shuffled ESD, traps), --base deltas, PEFT LoRA adapters, tbdiag diff."""

import json
import math
import sys
from pathlib import Path

import pytest
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tbdiag import TbdiagError, analyze
from tbdiag.cli import app
from tbdiag.analysis.export import read_analyses, to_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import llama  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def sq_evals(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.double()).square().sort().values


def one_line_error(res, message: str) -> None:
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert "--" not in message or "Traceback" not in res.output


# --randomize ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    w = torch.randn(200, 100)
    w[5, 7], w[50, 3] = 60.0, -45.0  # two outliers: after any shuffle, two eigenvalues far above the bulk
    return {"iid.weight": torch.randn(200, 100), "planted.weight": w, "conv.weight": torch.randn(16, 8, 3, 3)}


def test_randomize_finds_the_planted_traps_and_their_entries(planted):
    a = analyze(planted, randomize=True, seed=3, keep_spectra=True)
    rows = {r.name: r for r in a.layers}
    assert rows["iid"].num_traps == 0 and rows["iid"].traps == ()
    p = rows["planted"]
    assert p.num_traps == 2
    found = [(e["row"], e["col"], e["value"]) for t in p.traps for e in t["entries"]]
    assert found == [(5, 7, 60.0), (50, 3, -45.0)]  # the largest trap first, each with its one entry
    assert p.traps[0]["eigenvalue"] == pytest.approx(float(a.rand_spectra["planted"][-1]))
    for r in rows.values():  # same entries shuffled: same Frobenius norm, a short JS distance for iid weights
        assert float(a.rand_spectra[r.name].sum()) == pytest.approx(r.fnorm2, rel=1e-9)
        assert 0 < r.rand_distance < 0.1 and r.rand_bulk_max > 0
    assert len(a.rand_spectra["conv"]) == 72  # 9 kernel positions × 8, scaled by conv_norm like the real ESD


def test_randomize_is_seeded_per_layer_and_off_by_default(planted):
    alone = analyze({"iid.weight": planted["iid.weight"]}, randomize=True, seed=3).layers[0]
    together = {r.name: r for r in analyze(planted, randomize=True, seed=3).layers}["iid"]
    assert alone == together  # the permutation depends on the seed and the layer name, not on the order
    other = analyze({"iid.weight": planted["iid.weight"]}, randomize=True, seed=4).layers[0]
    assert other.rand_lambda_max != alone.rand_lambda_max
    plain = analyze(planted).layers[0]
    assert math.isnan(plain.rand_distance) and plain.num_traps is None and plain.num_spikes is not None
    with pytest.raises(TbdiagError, match="full estimator"):
        analyze(planted, randomize=True, estimator="farms")


def test_randomize_permutes_each_slice_and_layer_apart_reproducibly():
    """One permutation per (seed, layer name, slice), the same in every process: identical slices and
    identical layers are shuffled differently, and the seeding formula does not drift."""
    import numpy as np

    from tbdiag.esd.randomize import permutation

    assert permutation(0, "l1", 0, 8).tolist() == [0, 7, 1, 6, 4, 2, 3, 5]  # crc32-seeded: stable across runs
    assert permutation(0, "l1", 1, 8).tolist() == [7, 2, 6, 0, 5, 4, 3, 1]
    assert permutation(7, "l1", 0, 8).tolist() == [7, 2, 0, 3, 4, 1, 5, 6]
    assert permutation(2 ** 32 - 1, "l1", 0, 8).tolist() != permutation(0, "l1", 0, 8).tolist()  # the largest seed
    with pytest.raises(TbdiagError, match=r"seed 4294967296: must be a whole number from 0 to 2\^32 − 1"):
        analyze({"l1.weight": torch.ones(4, 4)}, randomize=True, seed=2 ** 32)  # would repeat seed 0
    torch.manual_seed(5)
    m = torch.randn(12, 6)
    conv = m[:, :, None, None].expand(12, 6, 2, 2).contiguous()  # four identical kernel slices
    a = analyze({"c.weight": conv, "l1.weight": m, "l2.weight": m.clone()}, randomize=True, seed=0, keep_spectra=True)
    assert len(np.unique(a.rand_spectra["c"].round(9))) == 24  # not 6 values four times: each slice its own
    rows = {r.name: r for r in a.layers}
    assert rows["l1"].lambda_max == rows["l2"].lambda_max and rows["l1"].rand_lambda_max != rows["l2"].rand_lambda_max


def test_randomize_conv_trap_is_scaled_and_placed_like_the_weight():
    torch.manual_seed(6)
    w = torch.randn(64, 32, 3, 3)
    w[10, 4, 1, 2] = 80.0  # kernel position (1, 2): slice 5
    a = analyze({"conv.weight": w}, randomize=True, seed=0, keep_spectra=True)
    (trap,) = a.layers[0].traps
    assert trap["eigenvalue"] == pytest.approx(float(a.rand_spectra["conv"][-1]), rel=1e-12)  # × conv_norm, as the ESD
    assert trap["entries"] == [{"slice": 5, "row": 10, "col": 4, "value": 80.0}]


def test_randomize_cli_json_round_trip_and_report(planted, tmp_path):
    src, out, html = tmp_path / "p.safetensors", tmp_path / "p.json", tmp_path / "p.html"
    save_file(planted, src)
    res = run("analyze", src, "--randomize", "--seed", "3", "--json", out, "--html", html)
    assert res.exit_code == 0, res.output
    assert "rand_dist" in res.stdout and "traps" in res.stdout
    doc = json.loads(out.read_text())
    assert doc["options"]["randomize"] is True and doc["options"]["seed"] == 3
    (back,) = read_analyses(out)
    assert {r.name: r.traps for r in back.layers}["planted"][0]["entries"][0] == {"slice": 0, "row": 5, "col": 7, "value": 60.0}
    assert to_json([back]).count('"traps"') == 3
    page = html.read_text()
    assert "trap at λ" in page and "W[5, 7] = 60.000" in page and "shuffled" in page
    one_line_error(run("analyze", src, "--randomize", "--seed", "-1"), "--seed -1: must be a whole number from 0")
    one_line_error(run("analyze", src, "--randomize", "--estimator", "farms"), "use --estimator full")


# --base: deltas of a fine-tuned sample checkpoint ------------------------------------------------------------

@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """cnn_trained.safetensors fine-tuned for three SGD steps on random 28×28 images."""
    from tbdiag.train.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN()
    model.load_state_dict(load_file(SAMPLES / "cnn_trained.safetensors"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    from tbdiag.io.checkpoint import order_metadata

    path = tmp_path_factory.mktemp("ft") / "cnn_finetuned.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata=order_metadata(list(state)))
    return path


def test_delta_equals_the_difference_of_the_weights(finetuned):
    base = SAMPLES / "cnn_trained.safetensors"
    a = analyze(finetuned, base=base, keep_spectra=True)
    assert a.view == "delta" and a.base == str(base) and [r.name for r in a.layers] == ["features.0", "features.3", "features.6", "fc"]
    w, w0 = load_file(finetuned), load_file(base)
    fc = sq_evals(w["fc.weight"] - w0["fc.weight"])
    assert torch.allclose(torch.from_numpy(a.spectra["fc"]), fc, rtol=1e-9, atol=1e-15)
    conv = (w["features.3.weight"] - w0["features.3.weight"]).double().permute(2, 3, 0, 1).reshape(9, 64, 32)
    expected = torch.linalg.svdvals(conv).square().flatten().sort().values * 0.5  # conv_norm
    assert torch.allclose(torch.from_numpy(a.spectra["features.3"]), expected, rtol=1e-9, atol=1e-15)
    assert a.layers[3].lambda_max < analyze(finetuned).layers[3].lambda_max / 100  # three small steps
    same = analyze(base, base=base)  # no change at all: every row says so, nothing crashes
    assert {r.status for r in same.layers} == {"zero_matrix"} and all(math.isnan(r.alpha) for r in same.layers)


def test_delta_cli_both_views_and_mismatches(finetuned, tmp_path):
    out = tmp_path / "d.json"
    res = run("analyze", finetuned, "--base", SAMPLES / "cnn_trained.safetensors", "--both", "--json", out)
    assert res.exit_code == 0, res.output
    assert "ΔW = W − W_base" in res.stdout
    docs = json.loads(out.read_text())
    assert [(d["view"], d["base"] is not None) for d in docs] == [("delta", True), ("weights", False)]
    assert [r["name"] for r in docs[0]["layers"]] == [r["name"] for r in docs[1]["layers"]]
    out.write_text("keep")
    bad = tmp_path / "other.safetensors"
    state = load_file(SAMPLES / "cnn_trained.safetensors")
    state["fc.weight"] = torch.randn(10, 64)
    save_file(state, bad)
    one_line_error(run("analyze", finetuned, "--base", bad, "--json", out), "layer fc is [10, 128] but [10, 64] in the base")
    del state["fc.weight"]
    save_file(state, bad)
    one_line_error(run("analyze", finetuned, "--base", bad, "--json", out), "layer fc not in the base")
    assert "out with --exclude" in run("analyze", finetuned, "--base", bad).stderr
    assert run("analyze", finetuned, "--base", bad, "--exclude", "fc", "-q").exit_code == 0  # the way out it names
    one_line_error(run("analyze", finetuned, "--both", "--json", out), "--both: shows the weights beside their change")
    one_line_error(run("analyze", finetuned, "--base", finetuned.parent / "nope.pt"), "no such file")
    assert out.read_text() == "keep"


# PEFT LoRA adapters ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A tiny LLaMA's base weights, and a LoRA adapter trained on it for five steps (rank and alpha patterns)."""
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora")
    model = llama(0)
    model.save_pretrained(root / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        rank_pattern={"down_proj": 12}, alpha_pattern={"layers.0.self_attn.q_proj": 32})
    peft_model = get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)
    x = torch.randint(0, 96, (4, 16))
    for _ in range(5):
        peft_model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(root / "adapter")
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return root / "adapter", root / "base", merged


def test_lora_updates_from_the_rank_r_problem(lora):
    adapter, _, merged = lora
    a = analyze(adapter, keep_spectra=True)
    assert a.format == "peft-lora" and a.view == "delta" and len(a.layers) == 9
    rows = {r.name: r for r in a.layers}
    base = {k: v for k, v in llama(0).state_dict().items()}
    for name, rank in (("model.layers.0.self_attn.q_proj", 4), ("model.layers.2.mlp.down_proj", 12),
                       ("model.layers.1.self_attn.v_proj", 4)):
        r = rows[name]
        assert r.n_evals == rank and f"rank-{rank} update" in r.warning
        assert r.status == ("too_few_evals" if rank < 10 else "ok")  # rank 4: measured, honestly not fitted
        full = sq_evals(merged[f"{name}.weight"] - base[f"{name}.weight"])[-rank:]  # s·B·A, alpha/rank patterns
        assert torch.allclose(torch.from_numpy(a.spectra[name]), full, rtol=1e-5)


def test_lora_merged_view_and_cli(lora, tmp_path):
    adapter, base, merged = lora
    m = analyze(adapter, base=base, view="merged", keep_spectra=True)
    assert m.view == "merged" and len(m.layers) == 9
    name = "model.layers.0.self_attn.q_proj"
    expected = sq_evals(merged[f"{name}.weight"])
    assert torch.allclose(torch.from_numpy(m.spectra[name]), expected, rtol=1e-5)
    res = run("analyze", adapter, "--base", base, "--both", "--json", "-", "-q")
    assert res.exit_code == 0, res.output
    assert [d["view"] for d in json.loads(res.stdout)] == ["delta", "merged"]
    html = tmp_path / "lora.html"
    assert run("analyze", adapter, "--html", html, "-q").exit_code == 0
    assert "each LoRA update ΔW = s·B·A" in html.read_text()
    with pytest.raises(TbdiagError, match="needs the base model"):
        analyze(adapter, view="merged")
    with pytest.raises(TbdiagError, match="holds no full weights"):
        analyze(adapter, view="weights")
    one_line_error(run("analyze", adapter, "--base", SAMPLES / "cnn_trained.safetensors", "--both"),
                   "is not a layer of the base model")
    res = run("analyze", adapter, "--base", base, "--both", "--plan")  # planned as analysed: both views
    assert res.exit_code == 0, res.output
    titles = [line for line in res.stdout.splitlines() if line.startswith("plan: ")]
    assert len(titles) == 2 and "ΔW checked against" in titles[0] and "merged into" in titles[1]
    assert f"mergedinto{base}" in "".join(res.stdout.split())  # the title wraps at the table's width
    assert run("analyze", adapter, "--plan").exit_code == 0


def test_adapter_delta_with_a_base_records_and_checks_it(lora):
    adapter, base, _ = lora
    alone = analyze(adapter, keep_spectra=True)
    checked = analyze(adapter, base=base, keep_spectra=True)  # the delta view: ΔW = s·B·A, the base only checked
    assert alone.base is None and checked.view == "delta" and checked.base == str(base / "model.safetensors")
    assert checked.to_dict()["base"] == checked.base
    assert [r.name for r in checked.layers] == [r.name for r in alone.layers]
    for name, evals in alone.spectra.items():
        assert np.array_equal(checked.spectra[name], evals)
    with pytest.raises(TbdiagError, match="is not a layer of the base model"):
        analyze(adapter, base=SAMPLES / "cnn_trained.safetensors", view="delta")

def test_plans_cover_deltas_and_randomized_analyses(finetuned):
    from tbdiag.analysis.options import AnalyzeOptions
    from tbdiag.analysis.plan import make_plan

    base = str(SAMPLES / "cnn_trained.safetensors")
    alone = make_plan(str(finetuned), AnalyzeOptions())
    delta = make_plan(str(finetuned), AnalyzeOptions(), base=base)
    twice = make_plan(str(finetuned), AnalyzeOptions(randomize=True))
    assert (alone.view, delta.view, delta.base) == ("weights", "delta", base)
    assert [x.name for x in delta.layers] == [x.name for x in analyze(finetuned, base=base).layers]
    assert delta.bytes == 2 * alone.bytes == twice.bytes  # ΔW reads both files; the twin reads the layer again
    assert [x.n_evals for x in delta.layers] == [x.n_evals for x in alone.layers]


def test_lora_bad_configs(lora, tmp_path):
    adapter, _, _ = lora
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    for change, message in (({"use_dora": True}, "DoRA"), ({"r": 0}, "r is 0"),
                            ({"rank_pattern": {}}, "has rank 12 but the config says 4"),
                            ({"rank_pattern": {"(": 4}}, "rank_pattern is {'(': 4}, not a map of regular expressions"),
                            ({"alpha_pattern": {"q_proj": "8"}}, "alpha_pattern is {'q_proj': '8'}, not a map"),
                            ({"modules_to_save": 5}, "modules_to_save is 5, not a list of module names")):
        (bad / "adapter_config.json").write_text(json.dumps({**config, **change}))
        one_line_error(run("analyze", bad), message)


# tbdiag diff ----------------------------------------------------------------------------------------------

def test_diff_sorted_by_alpha_change_json_html_and_errors(tmp_path):
    untrained, trained = SAMPLES / "cnn_untrained.safetensors", SAMPLES / "cnn_trained.safetensors"
    out, html = tmp_path / "diff.json", tmp_path / "diff.html"
    res = run("diff", untrained, trained, "--json", out, "--html", html)
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["schema"] == "tbdiag.diff/v1" and doc["only_a"] == doc["only_b"] == []
    names = [r["name"] for r in doc["layers"]]
    assert names == ["features.6", "fc", "features.3", "features.0"]  # |Δalpha| 25.7 > 1.9 > 1.7, then no alpha
    first = doc["layers"][0]
    assert first["delta"]["alpha"] == pytest.approx(first["b"]["alpha"] - first["a"]["alpha"]) and first["delta"]["alpha"] < -20
    assert doc["layers"][-1]["delta"]["alpha"] is None and doc["layers"][-1]["delta"]["log_norm"] is not None
    assert "features.6" in res.stdout.split("fc")[0]  # the table in the same order
    assert "Comparison of 2 checkpoints" in html.read_text()
    saved = tmp_path / "a.json"
    assert run("analyze", untrained, "--json", saved, "-q").exit_code == 0
    res = run("diff", saved, trained, "--json", "-", "-q")
    assert json.loads(res.stdout)["layers"][0]["name"] == "features.6"
    both = tmp_path / "both.json"
    assert run("analyze", untrained, trained, "--json", both, "-q").exit_code == 0
    one_line_error(run("diff", both, trained), "holds 2 analyses")
    one_line_error(run("diff", untrained, trained, "--json", trained), "is the input")
    one_line_error(run("diff", untrained, trained, "--top", "-1"), "--top -1")


def test_diff_compares_like_with_like(tmp_path):
    """A checkpoint beside an analysis JSON is analysed as that JSON was; other fits, or no common layer, are
    refused instead of printing the estimator's difference as a change of the model."""
    from tbdiag.analysis.core import analyze
    from tbdiag.finetune.diff import diff

    untrained, trained = SAMPLES / "cnn_untrained.safetensors", SAMPLES / "cnn_trained.safetensors"
    saved = tmp_path / "median.json"
    assert run("analyze", untrained, "--fit", "median", "--conv-norm", "1", "--json", saved, "-q").exit_code == 0
    res = run("diff", saved, trained, "--json", "-", "-q")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["a"]["fit"] == doc["b"]["fit"] == "median"
    direct = diff(analyze(untrained, fit="median", conv_norm=1.0), analyze(trained, fit="median", conv_norm=1.0))
    assert [math.nan if r["b"]["alpha"] is None else r["b"]["alpha"] for r in doc["layers"]] == pytest.approx(
        [r["b"]["alpha"] for r in direct["layers"]], nan_ok=True)
    one_line_error(run("diff", saved, trained, "--fit", "ks"), "was analysed with fit median and")
    with pytest.raises(TbdiagError, match="conv_norm 0.5 and .* with 1.0: their alphas are not comparable"):
        diff(analyze(untrained), analyze(trained, conv_norm=1.0))
    one_line_error(run("diff", trained, SAMPLES / "mlp_legacy.pth"), "have no layer in common")



def test_diff_reads_checkpoints_below_the_key_it_is_given(tmp_path):
    from safetensors.torch import load_file, save_file

    trained = load_file(SAMPLES / "cnn_trained.safetensors")
    both = tmp_path / "both.safetensors"
    save_file({**{f"ema.{k}": v for k, v in trained.items()}, **{f"model.{k}": 0.5 * v for k, v in trained.items()}}, both)
    saved = tmp_path / "ema.json"
    assert run("analyze", both, "--key", "ema", "--json", saved, "-q").exit_code == 0
    one_line_error(run("diff", saved, both), "have no layer in common")  # the JSON's key is not the file's
    res = run("diff", saved, both, "--key", "model", "--json", "-", "-q")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["layers"]
    assert {r["name"] for r in rows if r["status"] == ["ok", "ok"]} == {"features.3", "features.6", "fc"}
    assert all(r["delta"]["alpha"] == pytest.approx(0, abs=1e-9) for r in rows if r["status"] == ["ok", "ok"])


@pytest.fixture(scope="module")
def conv_lora(tmp_path_factory):
    """A small CNN and a LoRA adapter on its convolutions and its head, trained for three steps."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(32 * 6 * 6, 10))
    root = tmp_path_factory.mktemp("conv_lora")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(base, root / "base.safetensors")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "5"]))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(3):
        torch.nn.functional.cross_entropy(peft_model(x), y).backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(root / "adapter")
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return root / "adapter", root / "base.safetensors", base, merged


def test_conv_lora_updates_pool_r_eigenvalues_per_kernel_position(conv_lora):
    adapter, base_path, base, merged = conv_lora
    a = analyze(adapter, keep_spectra=True)
    rows = {r.name: r for r in a.layers}
    assert [(r.name, r.kind, r.n_evals) for r in a.layers] == [("0", "conv2d", 27), ("2", "conv2d", 36),
                                                              ("5", "linear", 4)]  # rank ≤ 3 inputs in conv 0
    assert a.summary["skipped"]["adapter_other"] == 0 and a.n_params == 4 * (27 + 16) + 4 * (144 + 32) + 4 * (1152 + 10)
    for name in ("0", "2"):  # ΔW sliced at each kernel position, × conv_norm, its non-zero eigenvalues
        delta = (merged[f"{name}.weight"] - base[f"{name}.weight"]).double()
        slices = delta.permute(2, 3, 0, 1).reshape(9, delta.shape[0], delta.shape[1])
        r = min(4, delta.shape[1])
        full = torch.linalg.svdvals(slices).square()[:, :r].flatten().sort().values * 0.5
        assert torch.allclose(torch.from_numpy(a.spectra[name]), full, rtol=1e-5, atol=1e-12), name
        assert rows[name].status == "ok" and "rank-4 update" in rows[name].warning
    from tbdiag.analysis.options import AnalyzeOptions
    from tbdiag.analysis.plan import make_plan

    assert [x.n_evals for x in make_plan(str(adapter), AnalyzeOptions()).layers] == [27, 36, 4]
    m = analyze(adapter, base=base_path, view="merged", keep_spectra=True)
    direct = analyze({k: v for k, v in merged.items()}, keep_spectra=True)
    for name in ("0", "2", "5"):
        assert torch.allclose(torch.from_numpy(m.spectra[name]), torch.from_numpy(direct.spectra[name]), rtol=1e-5)


def test_adapter_specs_merge_by_default_with_a_base_and_refuse_a_merge_without(lora):
    from tbdiag.esd.layers import plan_layers
    from tbdiag.finetune.lora import LowRankSpec, adapter_specs, open_adapter
    from tbdiag.io.checkpoint import open_checkpoint

    adapter_dir, base, _ = lora
    adapter = open_adapter(adapter_dir)
    base_specs = plan_layers(open_checkpoint(base), include_embeddings=True)[0]
    merged, _ = adapter_specs(adapter, base_specs)
    checked, _ = adapter_specs(adapter, base_specs, merge=False)
    assert not any(isinstance(s, LowRankSpec) for s in merged) and all(isinstance(s, LowRankSpec) for s in checked)
    with pytest.raises(TbdiagError, match="merging the adapter needs the base model's weights"):
        adapter_specs(adapter, None, merge=True)
