import math

import pytest
import torch
from safetensors.torch import save_file

from tbdiag import analyze
from tbdiag.checkpoint import clean_name, open_checkpoint, sniff
from tbdiag.errors import CheckpointError, TbdiagError


def rows_by_name(analysis):
    return {r.name: r for r in analysis.layers}


def assert_same_rows(a, b):
    ra, rb = rows_by_name(a), rows_by_name(b)
    assert ra.keys() == rb.keys()
    for name in ra:
        x, y = ra[name], rb[name]
        assert (x.kind, x.shape, x.n_evals, x.status, x.n_tail) == (y.kind, y.shape, y.n_evals, y.status, y.n_tail)
        for field in ("alpha", "D", "lambda_max", "fnorm2", "stable_rank"):
            u, v = getattr(x, field), getattr(y, field)
            assert (math.isnan(u) and math.isnan(v)) or u == pytest.approx(v, rel=1e-12), (name, field)


def test_every_form_gives_the_same_rows(all_forms):
    reference = analyze(all_forms["module"])
    assert {r.name for r in reference.layers} == {"conv", "conv1d", "rnn.weight_ih_l0", "rnn.weight_hh_l0",
                                                  "fc1", "fc2"}
    for form, source in all_forms.items():
        result = analyze(source)
        assert_same_rows(reference, result)
    assert analyze(all_forms["module"]).layers == analyze(all_forms["zip.pt"]).layers  # same order too


def test_formats_are_recognised_by_content(all_forms):
    assert open_checkpoint(all_forms["safetensors"]).format == "safetensors"
    assert open_checkpoint(all_forms["legacy"]).format == "torch-legacy"
    assert open_checkpoint(all_forms["renamed.pkl"]).format == "torch-zip"
    assert open_checkpoint(all_forms["sharded_safetensors"]).format == "safetensors-sharded"
    assert open_checkpoint(all_forms["sharded_bin"]).format == "torch-sharded"
    assert open_checkpoint(all_forms["hf_single_bin"]).format == "torch-zip"


def test_training_checkpoint_takes_weights_not_optimizer_state(all_forms):
    names = {t.name for t in open_checkpoint(all_forms["training_ckpt"]).tensors}
    assert "fc1.weight" in names and not any("exp_avg" in n or n.startswith("optimizer") for n in names)


def test_key_selects_an_entry(all_forms, tmp_path, tiny_state):
    p = tmp_path / "two.pt"
    doubled = {k: v * 2 for k, v in tiny_state.items()}
    torch.save({"model": tiny_state, "ema": doubled}, p)
    plain, ema = analyze(p), analyze(p, key="ema")
    assert rows_by_name(ema)["fc1"].lambda_max == pytest.approx(4 * rows_by_name(plain)["fc1"].lambda_max)
    with pytest.raises(TbdiagError, match="no entry 'nope'"):
        analyze(p, key="nope")


def test_clean_name():
    assert clean_name("module.layer1.0.conv1.weight") == "layer1.0.conv1.weight"
    assert clean_name("module.module._orig_mod.fc.weight") == "fc.weight"
    assert clean_name("encoder._orig_mod.fc.weight") == "encoder.fc.weight"
    assert clean_name("net.module.fc.weight") == "net.module.fc.weight"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_weights(tmp_path, tiny_state, dtype):
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tiny_state.items()}
    save_file(state, tmp_path / "m.safetensors")
    rows = rows_by_name(analyze(tmp_path / "m.safetensors"))
    ref = rows_by_name(analyze({k: v.double() if v.is_floating_point() else v for k, v in state.items()}))
    assert rows["fc1"].alpha == pytest.approx(ref["fc1"].alpha, rel=1e-12)


def test_torchscript_refused_unless_trusted(tmp_path, tiny):
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    p = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(p))
    with pytest.raises(CheckpointError, match="TorchScript.*--trust-pickle"):
        analyze(p)
    assert_same_rows(analyze(model), analyze(p, trust_pickle=True))


class NotAllowed:
    def __init__(self):
        self.w = torch.randn(20, 20)


def test_pickle_that_needs_code_is_refused_unless_trusted(tmp_path):
    p = tmp_path / "code.pt"
    torch.save({"obj": NotAllowed(), "fc.weight": torch.randn(30, 20)}, p)
    with pytest.raises(CheckpointError, match="would run code.*NotAllowed.*--trust-pickle"):
        analyze(p)
    assert [r.name for r in analyze(p, trust_pickle=True).layers] == ["fc"]


def test_pickled_module_with_trust(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Linear(30, 5))
    p = tmp_path / "whole_model.pt"
    torch.save({"model": model, "epoch": 1}, p)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        analyze(p)
    assert_same_rows(analyze(model), analyze(p, trust_pickle=True))


BAD_FILES = {
    "empty.pt": (b"", "empty file"),
    "text.pt": (b"hello, I am not a checkpoint\n", "not a checkpoint"),
    "zip.pt": (None, "not a PyTorch checkpoint"),
    "corrupt_header.safetensors": (b"\x0d\x00\x00\x00\x00\x00\x00\x00{\"a\": oops  }", "corrupt safetensors"),
    "huge_header.safetensors": (b"\xff\xff\x00\x00\x00\x00\x00\x00{\"a\":1}", "truncated safetensors"),
    "legacy_trunc.pt": (b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02", "not a readable PyTorch"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files_are_clear_errors(tmp_path, name):
    data, message = BAD_FILES[name]
    p = tmp_path / name
    if data is None:
        import zipfile

        with zipfile.ZipFile(p, "w") as z:
            z.writestr("readme.txt", "hi")
    else:
        p.write_bytes(data)
    with pytest.raises(CheckpointError, match=message) as info:
        open_checkpoint(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_truncated_files(tmp_path, tiny_state):
    for name, save in (("t.safetensors", lambda p: save_file(tiny_state, p)), ("t.pt", lambda p: torch.save(tiny_state, p))):
        p = tmp_path / name
        save(p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=str(p)):
            analyze(p)


def test_folders(tmp_path, tiny_state):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        open_checkpoint(tmp_path)
    (tmp_path / "a.pt").write_bytes(b"")
    (tmp_path / "b.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="several checkpoints"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "missing.safetensors")
    shard = tmp_path / "sharded"
    shard.mkdir()
    (shard / "model.safetensors.index.json").write_text('{"weight_map": {"fc.weight": "x.safetensors"}}')
    with pytest.raises(CheckpointError, match="shard x.safetensors is missing"):
        open_checkpoint(shard)


def test_no_layers_is_an_error(tmp_path):
    p = tmp_path / "norms.safetensors"
    save_file({"bn.weight": torch.ones(4), "bn.running_mean": torch.zeros(4)}, p)
    with pytest.raises(TbdiagError, match="no layers"):
        analyze(p)


def test_sniff_ignores_extension(tmp_path, tiny_state):
    p = tmp_path / "weights.dat"
    save_file(tiny_state, p)
    assert sniff(p) == "safetensors"
