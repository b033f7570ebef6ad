"""Peak memory and time of ``tbdiag analyze`` on a synthetic LLaMA-shaped, sharded bf16 checkpoint.

    python benchmarks/bench_llm.py [--layers 16 --hidden 2048 --intermediate 8192 --vocab 128256] [--ww]

Builds the checkpoint in a temporary folder (embedding, per block q/k/v/o attention with grouped k/v,
gate/up/down MLP, RMSNorm weights; the LM head tied to the embedding, so stored once, as Hugging Face
does), in 4 shards with a ``model.safetensors.index.json``. Then, each in a fresh process whose peak RSS
is read with ``wait4``: the interpreter + torch + tbdiag baseline (analysing a tiny file), tbdiag on the
checkpoint (default options: embedding left out), tbdiag with ``--embeddings``, and with ``--ww``
WeightWatcher's default ``analyze()`` on the same folder. Prints peak RSS against the checkpoint size and
the largest analysed layer (target: ≤ 3× that layer in float32 + the baseline), and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def build(folder: Path, layers: int, hidden: int, inter: int, vocab: int, kv: int, shards: int = 4) -> dict:
    """Write the checkpoint; returns {tensor name: shape}."""
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj.weight": (hidden, hidden), f"{p}.self_attn.k_proj.weight": (kv, hidden),
                       f"{p}.self_attn.v_proj.weight": (kv, hidden), f"{p}.self_attn.o_proj.weight": (hidden, hidden),
                       f"{p}.mlp.gate_proj.weight": (inter, hidden), f"{p}.mlp.up_proj.weight": (inter, hidden),
                       f"{p}.mlp.down_proj.weight": (hidden, inter), f"{p}.input_layernorm.weight": (hidden,),
                       f"{p}.post_attention_layernorm.weight": (hidden,)})
    names = list(shapes)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per_shard:(s + 1) * per_shard]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=g) / shapes[n][-1] ** 0.5).to(torch.bfloat16) for n in part}
        save_file(tensors, folder / fname)
        weight_map.update({n: fname for n in part})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden, "tie_word_embeddings": True}))
    return shapes


# Runs a module or code in a fresh interpreter and prints its VmHWM (peak RSS of this address space; unlike
# ru_maxrss it does not inherit the parent's high-water mark across fork + exec) as the last stderr line.
PEAK = ("import runpy, sys\n"
        "try:\n"
        "    if sys.argv[1] == '-c':\n"
        "        exec(sys.argv[2])\n"
        "    else:\n"
        "        sys.argv = sys.argv[1:]\n"
        "        runpy.run_module(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "finally:\n"
        "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "    print('VmHWM', hwm, file=sys.stderr)\n")


def peak_rss(args: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, exit code) of ``python -m args…`` (or ``-c code``) in a fresh process."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t
    lines = proc.stderr.strip().splitlines()
    if proc.returncode or not lines or not lines[-1].startswith("VmHWM"):
        print(proc.stderr[-2000:], file=sys.stderr)
        return seconds, float("nan"), proc.returncode or 1
    return seconds, int(lines[-1].split()[1]) / 1024, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--kv", type=int, default=512, help="rows of k_proj/v_proj (grouped-query attention)")
    parser.add_argument("--ww", action="store_true", help="also run WeightWatcher's default analyze (slow)")
    parser.add_argument("--dir", help="build the checkpoint here instead of a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "llama-like"
        folder.mkdir()
        t = time.perf_counter()
        shapes = build(folder, args.layers, args.hidden, args.intermediate, args.vocab, args.kv)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        n_params = sum(torch.Size(s).numel() for s in shapes.values())
        print(f"checkpoint: {n_params / 1e9:.2f}B parameters, bf16, {size / 1e9:.2f} GB in 4 shards "
              f"(built in {time.perf_counter() - t:.0f} s); torch threads {torch.get_num_threads()}")
        matrices = {n: s for n, s in shapes.items() if len(s) == 2}
        largest = max((s for n, s in matrices.items() if "embed" not in n), key=lambda s: s[0] * s[1])
        emb = matrices["model.embed_tokens.weight"]
        tiny = Path(tmp) / "tiny.safetensors"
        save_file({"fc.weight": torch.randn(64, 32)}, tiny)
        tb = ["tbdiag", "analyze", "-q", "--device", "cpu"]
        base_s, base_mb, _ = peak_rss([*tb, str(tiny), "--json", str(Path(tmp) / "t.json")])
        print(f"baseline (interpreter + torch + tbdiag, tiny file): {base_mb:.0f} MB peak RSS")
        runs = {"tbdiag": [*tb, str(folder), "--json", str(Path(tmp) / "a.json")],
                "tbdiag --embeddings": [*tb, str(folder), "--embeddings", "--json", str(Path(tmp) / "b.json")],
                "tbdiag --embeddings f32": [*tb, str(folder), "--embeddings", "--precision", "float32",
                                            "--json", str(Path(tmp) / "c.json")]}
        if args.ww:
            code = ("import logging, weightwatcher as ww; logging.disable(logging.INFO);"
                    f"ww.WeightWatcher(model={str(folder)!r}).analyze()")
            runs["weightwatcher default"] = ["-c", code]
        from tbdiag.analysis.options import AnalyzeOptions
        from tbdiag.analysis.plan import make_plan

        estimates = {"tbdiag": make_plan(str(folder), AnalyzeOptions(device="cpu")).seconds,
                     "tbdiag --embeddings": make_plan(str(folder), AnalyzeOptions(device="cpu", include_embeddings=True)).seconds}
        results = {}
        for label, cmd in runs.items():
            seconds, mb, rc = peak_rss(cmd)
            results[label] = (seconds, mb)
            layer = emb if "embeddings" in label or "weightwatcher" in label else largest
            layer_mb = layer[0] * layer[1] * 4 / 1e6
            target = 3 * layer_mb + base_mb
            print(f"{label:22s} {seconds:7.1f} s  peak RSS {mb:7.0f} MB  (exit {rc}); "
                  f"checkpoint {size / 1e6:.0f} MB; largest layer {layer[0]}×{layer[1]} = {layer_mb:.0f} MB in float32; "
                  f"target ≤ 3×layer + baseline = {target:.0f} MB: {'met' if mb <= target else 'MISSED'}; "
                  f"{seconds / (size / 1e9):.1f} s per GB"
                  + (f"; --plan estimated {estimates[label]:.0f} s of eigen-work" if label in estimates else ""))
        if "weightwatcher default" in results:
            ws, wm = results["weightwatcher default"]
            for label in ("tbdiag --embeddings", "tbdiag --embeddings f32"):
                ts, tm = results[label]
                print(f"WeightWatcher / {label}: time {ws / ts:.1f}× (target ≥ 5×), memory {tm / wm:.2f} of "
                      f"WeightWatcher's (target ≤ 1/3)")


if __name__ == "__main__":
    main()
