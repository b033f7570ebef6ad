"""LLM-scale features: bounded-memory Gram, FP8, MoE stacks, fused QKV, tied weights, FARMS, plans, ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tbdiag import analyze
from tbdiag.cli import app
from tbdiag.io.checkpoint import open_checkpoint
from tbdiag.errors import TbdiagError
from tbdiag.esd.layers import plan_layers
from tbdiag.esd.spectrum import gram, gram_macs

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
runner = CliRunner()


def alphas(a):
    return {r.name: r.alpha for r in a.layers}


def test_blockwise_gram_equals_one_product():
    torch.manual_seed(0)
    for shape in ((3, 700, 50), (2, 40, 900), (1, 600, 530)):  # the last: three column panels
        w = torch.randn(shape, dtype=torch.bfloat16)
        whole = gram(w, chunk_elements=1 << 30)
        blocks = gram(w, chunk_elements=1000)
        assert torch.allclose(whole, blocks, rtol=1e-12, atol=1e-9)
        tall = w.double() if shape[1] >= shape[2] else w.double().mT
        assert torch.allclose(whole, tall.mT @ tall, rtol=1e-12, atol=1e-9)
        lower = gram(w, chunk_elements=5000, full=False)
        assert torch.allclose(lower.tril(), torch.tril(tall.mT @ tall), rtol=1e-12, atol=1e-9)  # the lower triangle


def test_gram_macs_counts_the_lower_triangle_panels():
    assert gram_macs(700, 50) == 700 * 50 * 50  # one panel: the whole product
    assert gram_macs(530, 600) == 600 * (530 * 256 + 274 * 256 + 18 * 18)
    assert gram_macs(8192, 2048) == 8192 * 2048 * 2048 * 36 // 64  # 8 panels: 36 of 64 tiles


def test_fp8_block_quantised_weights_are_dequantised(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(256, 384)
    q = w.to(torch.float8_e4m3fn)
    scale = torch.rand(2, 3) + 0.5  # 128×128 blocks
    save_file({"layer.weight": q, "layer.weight_scale_inv": scale}, tmp_path / "fp8.safetensors")
    expected = q.float() * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
    got = analyze(tmp_path / "fp8.safetensors")
    ref = analyze({"layer.weight": expected})
    assert [r.name for r in got.layers] == ["layer"]
    assert got.layers[0].alpha == pytest.approx(ref.layers[0].alpha, rel=1e-12)
    assert got.layers[0].lambda_max == pytest.approx(ref.layers[0].lambda_max, rel=1e-12)
    save_file({"layer.weight": q}, tmp_path / "bare.safetensors")
    with pytest.raises(TbdiagError, match="FP8 layout is unknown"):
        analyze(tmp_path / "bare.safetensors")
    save_file({"layer.weight": q, "layer.weight_scale_inv": torch.rand(5, 7)}, tmp_path / "odd.safetensors")
    with pytest.raises(TbdiagError, match="not a block grid"):
        analyze(tmp_path / "odd.safetensors")


@pytest.mark.parametrize("as_file", [True, False])
def test_moe_stack_is_one_layer_per_expert(tmp_path, as_file):
    torch.manual_seed(0)
    stack = torch.randn(4, 96, 64)
    state = {"model.layers.0.mlp.experts.down_proj": stack, "model.layers.0.mlp.experts.down_proj_bias": torch.zeros(4, 96)}
    if as_file:
        save_file(state, tmp_path / "moe.safetensors")
    got = alphas(analyze(tmp_path / "moe.safetensors" if as_file else state))
    ref = alphas(analyze({f"e{i}.weight": stack[i] for i in range(4)}))
    assert list(got) == [f"model.layers.0.mlp.experts.down_proj.{i}" for i in range(4)]
    assert list(got.values()) == pytest.approx(list(ref.values()), rel=1e-12)


def test_split_qkv_on_request():
    torch.manual_seed(0)
    fused_rows, fused_cols = torch.randn(3 * 64, 64), torch.randn(64, 3 * 64)  # (3d, in) and GPT-2's (in, 3d)
    state = {"blk.attn.qkv_proj.weight": fused_rows, "h.0.attn.c_attn.weight": fused_cols}
    assert set(alphas(analyze(state))) == {"blk.attn.qkv_proj", "h.0.attn.c_attn"}
    got = alphas(analyze(state, split_qkv=True))
    ref = alphas(analyze({**{f"r{i}.weight": fused_rows[64 * i:64 * (i + 1)] for i in range(3)},
                          **{f"c{i}.weight": fused_cols[:, 64 * i:64 * (i + 1)] for i in range(3)}}))
    assert [got[f"blk.attn.qkv_proj.{p}"] for p in "qkv"] == pytest.approx([ref[f"r{i}"] for i in range(3)], rel=1e-12)
    assert [got[f"h.0.attn.c_attn.{p}"] for p in "qkv"] == pytest.approx([ref[f"c{i}"] for i in range(3)], rel=1e-12)


def test_tied_embedding_and_head_analysed_once(tmp_path):
    emb = torch.randn(100, 32)
    torch.save({"embed_tokens.weight": emb, "lm_head.weight": emb, "fc.weight": torch.randn(40, 32)}, tmp_path / "tied.pt")
    names = [r.name for r in analyze(tmp_path / "tied.pt", include_embeddings=True).layers]
    assert names == ["embed_tokens", "fc"]


def test_farms_removes_the_aspect_ratio_bias():
    torch.manual_seed(0)
    state = {"tall.weight": torch.randn(2048, 128), "square.weight": torch.randn(256, 256), "wide.weight": torch.randn(128, 1024)}
    # the median fit, as in the README's figures (analyze's default became ks)
    full, farms = alphas(analyze(state, fit="median")), alphas(analyze(state, fit="median", estimator="farms"))
    spread = lambda d: max(d.values()) - min(d.values())  # noqa: E731
    assert spread(full) > 2.0  # iid Gaussian matrices, yet alpha follows the shape
    assert spread(farms) < 0.1
    with pytest.raises(TbdiagError, match="estimator half"):
        analyze(state, estimator="half")


def test_plan_lists_layers_without_analysing(tmp_path):
    res = runner.invoke(app, ["analyze", str(SAMPLES / "mlp_sharded"), "--plan", "--json", str(tmp_path / "x.json")])
    assert res.exit_code == 0, res.output
    assert "net.1" in res.stdout and "est. s" in res.stdout and "total" in res.stdout
    assert not (tmp_path / "x.json").exists()


def _failing_rank(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from tbdiag.analysis.measure import measure_shared
    from tbdiag.analysis.options import AnalyzeOptions
    from tbdiag.io.checkpoint import TensorRef
    from tbdiag.esd.layers import LayerSpec

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)

    def broken() -> torch.Tensor:
        raise OSError("disk gone")

    specs = [LayerSpec("big", "linear", (400, 300), TensorRef("big.weight", (400, 300), torch.float32, load=broken)),
             LayerSpec("small", "linear", (40, 30), TensorRef("small.weight", (40, 30), torch.float32, load=lambda: torch.randn(40, 30)))]
    try:
        measure_shared(specs, AnalyzeOptions(device="cpu"))
        message = "no error"
    except TbdiagError as exc:
        message = str(exc)
    Path(out, f"rank{rank}.txt").write_text(message)
    dist.destroy_process_group()


def test_a_failing_rank_fails_every_rank_with_its_message(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_failing_rank, args=(f"file://{tmp_path / 'rdzv'}", str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert "distributed analysis failed" in text and "rank 0: disk gone" in text


def test_torchrun_two_processes_give_the_single_process_result(tmp_path):
    single, double = tmp_path / "one.json", tmp_path / "two.json"
    src = str(SAMPLES / "cnn_training_ckpt.pt")
    assert runner.invoke(app, ["analyze", src, "-q", "--fit", "ks", "--json", str(single)]).exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                          "tbdiag", "analyze", src, "-q", "--fit", "ks", "--json", str(double)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(double.read_text())
    for doc in (a, b):
        doc.pop("timing")
    assert a == b


def test_layers_solved_in_groups_give_the_same_rows(monkeypatch):
    from tbdiag.analysis import measure
    from tbdiag.esd import spectrum

    torch.manual_seed(0)
    state = {f"blocks.{i}.{n}.weight": torch.randn(*shape) for i in range(2)
             for n, shape in (("q", (96, 96)), ("k", (32, 96)), ("v", (32, 96)), ("up", (192, 96)), ("down", (96, 192)))}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = analyze(state)
        torch.set_num_threads(2)
        specs, _ = plan_layers(open_checkpoint(state))
        groups = [[s.name for s in g] for g in measure.solve_groups(specs, 2, torch.device("cpu"), torch.float64)]
        assert groups == [["blocks.0.q"], ["blocks.0.k", "blocks.0.v"], ["blocks.0.up", "blocks.0.down"],
                          ["blocks.1.q"], ["blocks.1.k", "blocks.1.v"], ["blocks.1.up", "blocks.1.down"]]
        monkeypatch.setattr(spectrum, "PARALLEL_MIN_WORK", 1)  # share even these small eigensolves
        grouped = analyze(state)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(alone.layers, grouped.layers):
        assert a.name == b.name and a.status == b.status == "ok"
        assert a.alpha == pytest.approx(b.alpha, rel=1e-9) and a.lambda_max == pytest.approx(b.lambda_max, rel=1e-12)
