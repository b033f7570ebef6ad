"""Fine-tune views held to values: diff's pairing rule (shared with --base), views that cannot be compared,
LoRA on embeddings, modules_to_save, rsLoRA and fan_in_fan_out against PEFT's own merge, ΔW in float64."""

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tbdiag import TbdiagError, analyze
from tbdiag.cli import app
from tbdiag.finetune.diff import diff

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import gpt2, llama  # noqa: E402

runner = CliRunner()


def run(*args):
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:  # the CLI's log handler writes to the runner's stream, closed now
        logging.getLogger().handlers.clear()


def sq_evals(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.double()).square().sort().values


def one_line_error(res, message: str) -> None:
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.output


# diff: one pairing rule with --base -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sides():
    """A and B: `same` doubled in B, `grown` of another shape, `gone` only in A, `new` only in B."""
    torch.manual_seed(0)
    same = torch.randn(64, 32)
    a = {"same.weight": same, "grown.weight": torch.randn(64, 32), "gone.weight": torch.randn(40, 20)}
    b = {"same.weight": 2 * same, "grown.weight": torch.randn(64, 48), "new.weight": torch.randn(30, 20)}
    return a, b


def test_diff_lists_changed_shapes_and_one_sided_layers_apart(sides, caplog):
    a, b = sides
    doc = diff(analyze(a), analyze(b))
    assert [r["name"] for r in doc["layers"]] == ["same"]  # grown gets no delta
    assert doc["changed_shape"] == [{"name": "grown", "shape_a": [64, 32], "shape_b": [64, 48]}]
    assert doc["only_a"] == ["gone"] and doc["only_b"] == ["new"]
    row = doc["layers"][0]
    assert row["delta"]["log_norm"] == pytest.approx(math.log10(4), rel=1e-12)  # B − A, B = 2·A
    assert row["delta"]["alpha"] == pytest.approx(0, abs=1e-9)  # scale-free
    assert "grown [64, 32] → [64, 48]" in caplog.text
    back = diff(analyze(b), analyze(a))  # the other way round: the sides swap
    assert back["only_a"] == ["new"] and back["only_b"] == ["gone"]
    assert back["layers"][0]["delta"]["log_norm"] == pytest.approx(-math.log10(4), rel=1e-12)
    assert back["changed_shape"] == [{"name": "grown", "shape_a": [64, 48], "shape_b": [64, 32]}]
    with pytest.raises(TbdiagError, match=r"have no layer of one shape in common \(grown \[64, 32\] → \[64, 48\]\)"):
        diff(analyze({"grown.weight": a["grown.weight"]}), analyze({"grown.weight": b["grown.weight"]}))


def test_diff_cli_says_so_and_base_refuses_the_same_pair(sides, tmp_path):
    a, b = sides
    fa, fb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, fa)
    save_file(b, fb)
    res = run("diff", fa, fb, "--json", "-")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["changed_shape"][0]["shape_b"] == [64, 48] and doc["only_b"] == ["new"]
    assert "not compared, changed shape: grown [64, 32] → [64, 48]" in res.stderr  # the warning
    assert "changed shape, not compared: grown [64, 32] → [64, 48]" in res.stderr  # the table (JSON on stdout)
    assert "changed shape, not compared: grown" in run("diff", fa, fb).stdout
    # analyze --base follows the same rule: the pair is never subtracted (here refused, naming both shapes)
    save_file({k: v for k, v in b.items() if k != "new.weight"}, fb)
    one_line_error(run("analyze", fb, "--base", fa), "layer grown is [64, 48] but [64, 32] in the base")
    assert run("analyze", fb, "--base", fa, "--exclude", "grown", "-q").exit_code == 0
    two = {"x.weight": torch.randn(8, 4), "y.weight": torch.randn(9, 4)}
    with pytest.raises(TbdiagError, match=r"layer x is \[8, 4\] but \[8, 5\] .* \(and 1 more layers of another"):
        analyze(two, base={"x.weight": torch.randn(8, 5), "y.weight": torch.randn(9, 5)})


def test_diff_refuses_sides_of_different_views(tmp_path):
    torch.manual_seed(1)
    w0 = {"fc.weight": torch.randn(64, 32)}
    w1 = {"fc.weight": w0["fc.weight"] + 0.1 * torch.randn(64, 32)}
    delta, weights = analyze(w1, base=w0), analyze(w1)
    with pytest.raises(TbdiagError, match=r"describes updates ΔW and .* weights W: their metrics are not comparable; "
                                          r"compare updates with updates \(each against its base model\) or weights"):
        diff(delta, weights)
    with pytest.raises(TbdiagError, match="describes weights W and"):
        diff(weights, delta)
    assert diff(delta, analyze(w0, base=w1))["layers"][0]["delta"]["log_norm"] == pytest.approx(0, abs=1e-12)
    saved, ft = tmp_path / "delta.json", tmp_path / "ft.safetensors"
    save_file(w1, ft)
    save_file(w0, tmp_path / "base.safetensors")
    assert run("analyze", ft, "--base", tmp_path / "base.safetensors", "--json", saved, "-q").exit_code == 0
    one_line_error(run("diff", saved, ft), "(weights view) weights W: their metrics are not comparable")


def test_diff_randomized_sides(caplog):
    torch.manual_seed(2)
    w = {"fc.weight": torch.randn(80, 40)}
    plain, shuffled = analyze(w), analyze(w, randomize=True, seed=1)
    doc = diff(plain, shuffled)
    row = doc["layers"][0]
    assert row["delta"]["alpha"] == 0 and math.isnan(row["delta"]["rand_distance"])  # alpha alike, rand missing
    assert math.isnan(row["a"]["num_traps"]) and math.isnan(row["delta"]["num_traps"])  # not measured: nan, not 0
    assert row["b"]["rand_distance"] == shuffled.layers[0].rand_distance and doc["b"]["randomize"] is True
    assert "only <state dict> was analysed with randomize" in caplog.text
    assert diff(shuffled, analyze(w, randomize=True, seed=1))["layers"][0]["delta"]["rand_distance"] == 0
    with pytest.raises(TbdiagError, match="seed 1 and .* with 2: their randomised metrics are not comparable"):
        diff(shuffled, analyze(w, randomize=True, seed=2))


# ΔW in float64 -------------------------------------------------------------------------------------------------

def test_delta_is_taken_in_float64_and_in_order():
    from tbdiag.analysis.core import plan_source
    from tbdiag.analysis.options import AnalyzeOptions

    torch.manual_seed(3)
    w0 = 1e4 * torch.randn(64, 32, dtype=torch.float64)
    w = w0 + 1e-6 * torch.randn(64, 32, dtype=torch.float64)  # far below float32's resolution at 1e4
    a = analyze({"fc.weight": w}, base={"fc.weight": w0}, keep_spectra=True)
    exact = sq_evals(w - w0)
    assert torch.allclose(torch.from_numpy(a.spectra["fc"]), exact, rtol=1e-6, atol=0)
    in_float32 = sq_evals(w.float() - w0.float())
    assert not torch.allclose(in_float32, exact, rtol=0.1)  # the bug this test is for would be seen
    (spec,) = plan_source({"fc.weight": w}, AnalyzeOptions(), base={"fc.weight": w0}).specs
    extra = analyze({"fc.weight": w}, base={"fc.weight": w0, "more.weight": 2 * w0, "other.weight": 3 * w0})
    assert extra.summary["skipped"]["base_only"] == 2
    assert spec.ref.dtype == torch.float64 and torch.equal(spec.ref.load(), w - w0)  # W − W_base, not the reverse


# LoRA: embeddings, modules_to_save, rsLoRA, fan_in_fan_out against PEFT's merge -------------------------------

def _perturbed_adapter(model, config, root: Path):
    """Save ``model`` as the base, wrap it, move every trainable tensor (B starts at zero), save the adapter;
    return the base state and PEFT's merged state."""
    from peft import get_peft_model

    model.save_pretrained(root / "base")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, config)
    torch.manual_seed(4)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(root / "adapter")
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return base, merged


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    """LoRA on the token embedding and q_proj with rsLoRA (s = 8/√4 = 4, not 8/4), lm_head in modules_to_save."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("emb_lora")
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["embed_tokens", "q_proj"],
                        modules_to_save=["lm_head"])
    base, merged = _perturbed_adapter(llama(0), config, root)
    return root / "adapter", root / "base", base, merged



def test_an_adapted_head_tied_to_the_embedding_is_checked_and_merged_with_it(tmp_path):
    """A tied model saves lm_head once, as model.embed_tokens: the adapter's lm_head is found there."""
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    _, merged = _perturbed_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]), tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "base" / "model.safetensors")
    delta = analyze(tmp_path / "adapter", base=tmp_path / "base")
    assert delta.base == str(tmp_path / "base" / "model.safetensors") and "lm_head" in {r.name for r in delta.layers}
    both = analyze(tmp_path / "adapter", base=tmp_path / "base", view="merged", keep_spectra=True)
    assert torch.allclose(torch.from_numpy(both.spectra["lm_head"]), sq_evals(merged["lm_head.weight"]), rtol=1e-5)
    with pytest.raises(TbdiagError, match="no entries to choose from with key 'ema'; leave the key out"):
        analyze(tmp_path / "adapter", key="ema")

def test_lora_embedding_and_rslora_updates_equal_pefts_merge(llama_adapter, caplog):
    caplog.set_level(logging.INFO, "tbdiag.finetune.lora")
    adapter, _, base, merged = llama_adapter
    a = analyze(adapter, keep_spectra=True)
    rows = {r.name: r for r in a.layers}
    assert list(rows) == ["model.embed_tokens", *(f"model.layers.{i}.self_attn.q_proj" for i in range(3))]
    assert (rows["model.embed_tokens"].kind, rows["model.embed_tokens"].shape) == ("embedding", (96, 64))
    for name in rows:
        full = sq_evals(merged[f"{name}.weight"] - base[f"{name}.weight"])[-4:]
        assert torch.allclose(torch.from_numpy(a.spectra[name]), full, rtol=1e-5), name  # PEFT merges in float32
    # left out, and said so: lm_head (full weights, no update) and PEFT's saved copy of the base embedding
    assert a.summary["skipped"] == {"excluded": 0, "adapter_other": 1, "modules_to_save": 1}
    assert "left out modules_to_save lm_head: full weights, no update" in caplog.text
    copy = [r for r in caplog.records if "model.embed_tokens.base_layer" in r.getMessage()]
    assert [r.levelno for r in copy] == [logging.INFO]  # PEFT's saved copy of the base embedding: expected


def test_lora_merged_view_has_the_saved_modules(llama_adapter):
    adapter, base_path, base, merged = llama_adapter
    m = analyze(adapter, base=base_path, view="merged", keep_spectra=True)
    assert [r.name for r in m.layers][-1] == "lm_head" and m.summary["skipped"]["modules_to_save"] == 0
    for name in ("lm_head", "model.embed_tokens", "model.layers.1.self_attn.q_proj"):
        assert torch.allclose(torch.from_numpy(m.spectra[name]), sq_evals(merged[f"{name}.weight"]), rtol=1e-6), name
    assert not torch.allclose(sq_evals(merged["lm_head.weight"]), sq_evals(base["lm_head.weight"]), rtol=1e-3)
    excluded = analyze(adapter, base=base_path, view="merged", exclude=("lm_head", "*.1.self_attn.q_proj"))
    assert [r.name for r in excluded.layers] == ["model.embed_tokens", "model.layers.0.self_attn.q_proj",
                                                 "model.layers.2.self_attn.q_proj"]
    assert excluded.summary["skipped"]["excluded"] == 2
    other = dict(base, **{"model.layers.2.self_attn.q_proj.weight": torch.randn(64, 32)})
    with pytest.raises(TbdiagError, match=r"q_proj is \[64, 64\] in the adapter but \[64, 32\] in the base model"):
        analyze(adapter, base=other, view="merged")


@pytest.mark.parametrize("key, module", [
    ("q_proj", "model.layers.0.self_attn.q_proj"), ("proj", "model.layers.0.self_attn.q_proj"),
    ("layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"), ("self_attn", "model.layers.0.self_attn.q_proj"),
    ("s.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"), (r"^model\.layers\.0\.mlp$", "model.layers.0.mlp"),
    (r"layers\.\d\.mlp", "model.layers.3.mlp"), ("q_proj", "q_proj"), ("q_proj", "q_proj_extra")])
def test_pattern_rule_is_pefts(key, module):
    from peft.utils.other import get_pattern_key

    from tbdiag.finetune.lora_config import pattern_matches

    assert pattern_matches(key, module) == (get_pattern_key([key], module) == key)


def test_lora_fan_in_fan_out_merged_equals_pefts_merge(tmp_path):
    """GPT-2's Conv1D stores W in × out: ΔW = s·(B·A)ᵀ. c_proj is square, so a missed transpose would go
    unnoticed by any shape check and only the values tell."""
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    base, merged = _perturbed_adapter(gpt2(0), config, tmp_path)
    delta = analyze(tmp_path / "adapter", keep_spectra=True)
    rows = {r.name: r for r in delta.layers}
    assert rows["transformer.h.0.attn.c_attn"].shape == (64, 192)  # as the Conv1D stores it
    m = analyze(tmp_path / "adapter", base=tmp_path / "base", view="merged", keep_spectra=True)
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.2.mlp.c_proj"):
        w = merged[f"{name}.weight"]
        assert torch.allclose(torch.from_numpy(m.spectra[name]), sq_evals(w), rtol=1e-6), name
        update = sq_evals(w - base[f"{name}.weight"])[-4:]
        assert torch.allclose(torch.from_numpy(delta.spectra[name]), update, rtol=1e-5), name


def test_lora_merged_with_float64_weights_stays_float64(tmp_path):
    torch.manual_seed(5)
    w0 = 1e4 * torch.randn(64, 32, dtype=torch.float64)
    a, b = torch.randn(4, 32, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)
    (tmp_path / "adapter").mkdir()
    save_file({"base_model.model.fc.lora_A.weight": a, "base_model.model.fc.lora_B.weight": b},
              tmp_path / "adapter" / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 2}  # s = 2/4
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    save_file({"fc.weight": w0}, tmp_path / "base.safetensors")
    m = analyze(tmp_path / "adapter", base=tmp_path / "base.safetensors", view="merged", keep_spectra=True)
    exact = sq_evals(w0 + 0.5 * b @ a)
    assert torch.allclose(torch.from_numpy(m.spectra["fc"]), exact, rtol=1e-12)
    assert not torch.allclose(sq_evals(w0.float() + (0.5 * b @ a).float()), exact, rtol=1e-9)  # float32 is seen


def test_diff_sides_carry_the_alpha_spread(sides):
    """Both sides name their alpha_std (the follow-up's imbalance number), as their summaries compute it."""
    import statistics

    a, b = analyze(sides[0], fit="median"), analyze(sides[1], fit="median")
    doc = diff(a, b)
    for side, analysis in (("a", a), ("b", b)):
        alphas = [r.alpha for r in analysis.layers if r.status == "ok"]
        assert doc[side]["alpha_std"] == pytest.approx(statistics.pstdev(alphas), rel=1e-12)
    assert doc["a"]["alpha_std"] != doc["b"]["alpha_std"]  # the two sides hold different layers


class _Marker:
    """Unpickling this object writes a file: proof that code from a checkpoint ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_saved_analysis_never_grants_trust_pickle(tmp_path):
    """A document's options carry measurement settings only: trust_pickle (and device) in a JSON are ignored,
    so diff never unpickles a checkpoint beside it that needs code."""
    torch.manual_seed(0)
    good = tmp_path / "a.safetensors"
    save_file({"fc.weight": torch.randn(64, 32)}, good)
    saved = tmp_path / "a.json"
    assert run("analyze", good, "--json", saved, "-q").exit_code == 0
    doc = json.loads(saved.read_text())
    doc["options"].update(trust_pickle=True, device="cuda:7")
    saved.write_text(json.dumps(doc))
    marker = tmp_path / "PWNED"
    evil = tmp_path / "b.pt"
    torch.save({"fc.weight": torch.randn(64, 32), "x": _Marker(str(marker))}, evil)
    res = run("diff", saved, evil)
    assert res.exit_code == 2 and "--trust-pickle" in res.stderr and not marker.exists(), res.output
