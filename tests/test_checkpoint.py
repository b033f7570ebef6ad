import builtins
import io
import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tbdiag import analyze
from tbdiag.io.checkpoint import open_checkpoint, sniff
from tbdiag.io.tensors import clean_name
from tbdiag.errors import CheckpointError, TbdiagError

from tests.conftest import write_sharded_safetensors


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



def test_key_selects_a_prefix_of_a_safetensors_file(tmp_path, tiny_state):
    p = tmp_path / "two.safetensors"
    flat = {**{f"model.{k}": v for k, v in tiny_state.items()}, **{f"ema.{k}": 2 * v for k, v in tiny_state.items()}}
    save_file({k: v.contiguous() for k, v in flat.items()}, p)
    every, ema = analyze(p), analyze(p, key="ema")
    assert {r.name for r in ema.layers} == {r.name for r in analyze(tiny_state).layers}  # read without the prefix
    assert len(every.layers) == 2 * len(ema.layers)
    assert rows_by_name(ema)["fc1"].lambda_max == pytest.approx(4 * rows_by_name(every)["model.fc1"].lambda_max)
    with pytest.raises(TbdiagError, match="no tensor named 'mod.…'"):
        analyze(p, key="mod")  # a prefix of names, not of characters
    state = {**{f"model.{k}": v.contiguous() for k, v in tiny_state.items()},
             **{f"ema.{k}": 2 * v for k, v in tiny_state.items()}}
    folder = write_sharded_safetensors(tmp_path / "hf", state)  # ema.* only in the second shard
    assert {r.name for r in analyze(folder, key="ema").layers} == {r.name for r in ema.layers}
    with pytest.raises(TbdiagError, match="hf: no tensor named 'mod.…'"):
        analyze(folder, key="mod")


def test_key_below_a_wrapper_prefix_and_names_that_clean_alike(tmp_path, tiny_state, caplog):
    p = tmp_path / "wrapped.safetensors"
    save_file({f"module.ema.{k}": v.contiguous() for k, v in tiny_state.items()}, p)
    expected = {r.name for r in analyze(tiny_state).layers}
    assert {r.name for r in analyze(p, key="ema").layers} == {r.name for r in analyze(p, key="module.ema").layers} \
        == expected
    twice = tmp_path / "twice.safetensors"
    save_file({"fc.weight": torch.ones(64, 32), "_orig_mod.fc.weight": torch.zeros(64, 32)}, twice)
    refs = open_checkpoint(twice).tensors
    assert [t.name for t in refs] == ["fc.weight"] and torch.equal(refs[0].load(), torch.zeros(64, 32))  # name order
    assert "tensor fc.weight appears twice (also as fc.weight); keeping the first" in caplog.text

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
    with pytest.raises(CheckpointError, match="TorchScript.*trust_pickle=True"):
        analyze(p)
    assert_same_rows(analyze(model), analyze(p, trust_pickle=True))


class NotAllowed:
    def __init__(self):
        self.w = torch.randn(20, 20)


def test_pickle_that_needs_code_is_refused_unless_trusted(tmp_path):
    p = tmp_path / "code.pt"
    torch.save({"obj": NotAllowed(), "fc.weight": torch.randn(30, 20)}, p)
    with pytest.raises(CheckpointError, match="would run code.*NotAllowed.*trust_pickle=True"):
        analyze(p)
    assert [r.name for r in analyze(p, trust_pickle=True).layers] == ["fc"]


def test_pickled_module_with_trust(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Linear(30, 5))
    p = tmp_path / "whole_model.pt"
    torch.save({"model": model, "epoch": 1}, p)
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
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


# --- Safetensors headers that lie: checked as the safetensors library checks them --------------------------

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


def one_line_error(exc_info, path) -> str:
    text = str(exc_info.value)
    assert str(path) in text and "\n" not in text and "--" not in text, text
    return text


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_safetensors(path: Path, header: dict, data: bytes, length_delta: int = 0) -> Path:
    raw = json.dumps(header).encode() + b" " * 8  # trailing spaces are valid padding
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw) + length_delta) + raw + data)
    return path


def test_header_length_four_bytes_short_is_an_error_not_shifted_numbers(tmp_path):
    folder = tmp_path / "mlp_sharded"
    shutil.copytree(SAMPLES / "mlp_sharded", folder)
    before = {r.name: r.alpha for r in analyze(folder, fit="median").layers}
    shard = folder / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert data[8 + n - 4:8 + n] == b"    "  # the padding lets the shorter header parse: only the tiling check sees it
    shard.write_bytes(struct.pack("<Q", n - 4) + data[8:])
    with pytest.raises(CheckpointError, match="last 4 bytes of the file belong to no tensor") as info:
        analyze(folder, fit="median")
    one_line_error(info, shard)
    shard.write_bytes(data)
    assert {r.name: r.alpha for r in analyze(folder, fit="median").layers} == before


def _header_case(case: str, header: dict, data: bytes) -> tuple[dict, bytes, int, str]:
    """Mutate a two-tensor header (``a`` then ``b`` in the data) into ``case``; returns what to write and expect."""
    a, b = header["a.weight"], header["b.weight"]
    delta = 0
    if case == "length_short":
        delta, expect = -8, "belong to no tensor"
    elif case == "length_long":
        delta, expect = 8, "beyond the end|corrupt safetensors header"
    elif case == "not_an_object":
        header = ["a.weight"]
        expect = "not a checkpoint"  # a header must start with {
    elif case == "unknown_dtype":
        a["dtype"], expect = "F33", "'a.weight' has dtype 'F33'"
    elif case == "dtype_not_a_string":
        a["dtype"], expect = 4, "'a.weight' has dtype 4"
    elif case == "shape_not_a_list":
        a["shape"], expect = 12, "'a.weight' has shape 12"
    elif case == "negative_shape":
        a["shape"], expect = [-3, -4], "'a.weight' has shape"
    elif case == "float_shape":
        a["shape"], expect = [3.0, 4], "'a.weight' has shape"
    elif case == "bool_shape":
        a["shape"], expect = [True, 12], "'a.weight' has shape"
    elif case == "offsets_reversed":
        a["data_offsets"], expect = a["data_offsets"][::-1], "'a.weight' has data_offsets"
    elif case == "offsets_three":
        a["data_offsets"], expect = [*a["data_offsets"], 0], "'a.weight' has data_offsets"
    elif case == "entry_not_a_dict":
        header["a.weight"], expect = [1, 2], "'a.weight' is not a"
    elif case == "shape_too_small":
        a["shape"], expect = [a["shape"][0], a["shape"][1] - 1], "'a.weight' is F32.*data_offsets span"
    elif case == "shape_too_large":
        a["shape"], expect = [a["shape"][0] + 1, a["shape"][1]], "'a.weight' is F32.*data_offsets span"
    elif case == "dtype_size_mismatch":
        a["dtype"], expect = "F16", "'a.weight' is F16"
    elif case == "overlap":
        b["data_offsets"] = [b["data_offsets"][0] - 4, b["data_offsets"][1] - 4]
        data, expect = data[:-4], "'a.weight' and 'b.weight' overlap"
    elif case == "gap":
        b["data_offsets"] = [b["data_offsets"][0] + 4, b["data_offsets"][1] + 4]
        data, expect = data + b"\0" * 4, "belong to no tensor \\(before 'b.weight'"
    elif case == "trailing_bytes":
        data, expect = data + b"\0" * 4, "last 4 bytes"
    elif case == "beyond_end":
        data, expect = data[:-4], "'b.weight' lies beyond the end"
    elif case == "metadata_not_strings":
        header["__metadata__"], expect = {"format": 1}, "__metadata__"
    else:
        raise AssertionError(case)
    return header, data, delta, expect


HEADER_CASES = ["length_short", "length_long", "not_an_object", "unknown_dtype", "dtype_not_a_string",
                "shape_not_a_list", "negative_shape", "float_shape", "bool_shape", "offsets_reversed", "offsets_three",
                "entry_not_a_dict", "shape_too_small", "shape_too_large", "dtype_size_mismatch", "overlap", "gap",
                "trailing_bytes", "beyond_end", "metadata_not_strings"]


@pytest.mark.parametrize("case", HEADER_CASES)
def test_lying_safetensors_headers_are_clear_errors(tmp_path, case):
    torch.manual_seed(0)
    good = tmp_path / "good.safetensors"
    save_file({"a.weight": torch.randn(30, 40), "b.weight": torch.randn(20, 30)}, good)
    header, data = split_safetensors(good)
    assert header["a.weight"]["data_offsets"][0] == 0  # a first, then b, as the cases assume
    analyze(good)  # the unmutated file is fine
    header, data, delta, expect = _header_case(case, header, data)
    bad = write_safetensors(tmp_path / "bad.safetensors", header, data, delta)
    with pytest.raises(CheckpointError, match=expect) as info:
        analyze(bad)
    one_line_error(info, bad)


def test_duplicate_tensor_names_in_a_header(tmp_path):
    p = tmp_path / "dup.safetensors"
    raw = b'{"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, ' \
          b'"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}}'
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(32))
    with pytest.raises(CheckpointError, match="'a.weight' appears twice") as info:
        open_checkpoint(p)
    one_line_error(info, p)


def test_absurd_header_length_is_refused_before_reading(tmp_path):
    p = tmp_path / "huge.safetensors"
    with p.open("wb") as f:  # a sparse 300 MB file whose header length says 200 MB
        f.write(struct.pack("<Q", 200_000_000) + b"{")
        f.truncate(300_000_000)
    with pytest.raises(CheckpointError, match="header length says 200000000 bytes") as info:
        open_checkpoint(p)
    one_line_error(info, p)


def test_header_length_that_starts_like_a_pickle(tmp_path):
    torch.manual_seed(0)
    good = tmp_path / "good.safetensors"
    save_file({"fc.weight": torch.randn(12, 10)}, good)
    header, data = split_safetensors(good)
    raw = json.dumps(header).encode()
    p = tmp_path / "len128.safetensors"
    p.write_bytes(struct.pack("<Q", 384) + raw.ljust(384) + data)  # 384 = 0x180: its first byte is 0x80
    assert p.read_bytes()[0] == 0x80 and sniff(p) == "safetensors"
    assert_same_rows(analyze(good), analyze(p))


def test_safetensors_dtypes_tbdiag_skips_still_tile_the_file(tmp_path):
    p = tmp_path / "u16.safetensors"
    save_file({"fc.weight": torch.randn(12, 10), "ids": torch.arange(6, dtype=torch.int64).to(torch.uint16)}, p)
    assert [t.name for t in open_checkpoint(p).tensors] == ["fc.weight"]
    header, data = split_safetensors(p)
    header["ids"]["shape"] = [7]
    with pytest.raises(CheckpointError, match="'ids' is U16 \\[7\\], 14 bytes"):
        open_checkpoint(write_safetensors(tmp_path / "bad.safetensors", header, data))


# --- Folders -----------------------------------------------------------------------------------------------

def test_symlink_loops_in_a_folder(tmp_path, tiny_state):
    folder = write_sharded_safetensors(tmp_path / "m", tiny_state)
    (folder / "model.safetensors.index.json").unlink()
    reference = analyze(folder)
    (folder / "sub").symlink_to(folder)  # a loop that is not a shard: ignored
    assert_same_rows(reference, analyze(folder))
    loop = folder / "loop.safetensors"
    loop.symlink_to(loop)  # named like a shard: an error that names it
    with pytest.raises(CheckpointError, match="broken or looping symbolic link") as info:
        analyze(folder)
    one_line_error(info, loop)
    with pytest.raises(CheckpointError, match="broken or looping symbolic link"):
        analyze(loop)


def test_a_folder_named_like_a_shard(tmp_path, tiny_state):
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(tiny_state, folder / "model.safetensors")
    reference = analyze(folder / "model.safetensors")
    (folder / "extra.safetensors").mkdir()  # beside a real shard: passed over
    assert_same_rows(reference, analyze(folder))
    (folder / "model.safetensors").unlink()  # the only candidate: an error
    with pytest.raises(CheckpointError, match="extra.safetensors: not a file") as info:
        analyze(folder)
    one_line_error(info, folder)
    with pytest.raises(CheckpointError, match="not a regular file"):
        sniff(folder / "extra.safetensors")


def test_a_pipe_is_refused_without_waiting(tmp_path):
    p = tmp_path / "fifo.pt"
    os.mkfifo(p)
    with pytest.raises(CheckpointError, match="not a regular file") as info:
        analyze(p)
    one_line_error(info, p)


def denying(real_open, target: Path):
    def open_(path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and Path(path) == target:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    return open_


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "shard_index"])
def test_unreadable_files(tmp_path, tiny_state, monkeypatch, fmt):
    if fmt == "shard_index":
        folder = write_sharded_safetensors(tmp_path / "m", tiny_state)
        target, source = folder / "model.safetensors.index.json", folder
    else:
        target = source = tmp_path / f"m.{'safetensors' if fmt == 'safetensors' else 'pt'}"
        (save_file if fmt == "safetensors" else torch.save)(tiny_state, target)
    target.chmod(0)
    if os.access(target, os.R_OK):  # root reads anyway: make opening it fail as it does for anyone else
        for module, name in ((os, "open"), (io, "open"), (builtins, "open")):
            monkeypatch.setattr(module, name, denying(getattr(module, name), target))
    with pytest.raises(CheckpointError, match="cannot be read \\(Permission denied\\)") as info:
        analyze(source)
    one_line_error(info, target)


def test_permission_denied_mid_analysis_is_a_clear_error(tmp_path, tiny_state, monkeypatch):
    p = tmp_path / "m.safetensors"
    save_file(tiny_state, p)
    ckpt = open_checkpoint(p)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(CheckpointError, match="cannot be read") as info:
        ckpt.tensors[0].load()
    one_line_error(info, p)


INDEX_CASES = {
    "parent": ("../outside.safetensors", "lies outside the folder"),
    "absolute": ("/tmp/outside.safetensors", "lies outside the folder"),
    "folder": ("sub.safetensors", "is a folder, not a file"),
    "loop": ("loop.safetensors", "broken or looping symbolic link"),
    "missing": ("gone.safetensors", "shard gone.safetensors is missing"),
    "not_a_string": (5, "not a non-empty map"),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_shard_index_pointing_at_the_wrong_thing(tmp_path, tiny_state, case):
    folder = write_sharded_safetensors(tmp_path / "m", tiny_state)
    (tmp_path / "outside.safetensors").write_bytes((folder / "model-00001-of-00002.safetensors").read_bytes())
    (folder / "sub.safetensors").mkdir()
    (folder / "loop.safetensors").symlink_to(folder / "loop.safetensors")
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    target, expect = INDEX_CASES[case]
    first = next(iter(doc["weight_map"]))
    doc["weight_map"][first] = target if case != "absolute" else str(tmp_path / "outside.safetensors")
    index.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=expect) as info:
        analyze(folder)
    one_line_error(info, index)


@pytest.mark.parametrize("weight_map", [[], {}, "model.safetensors", None])
def test_shard_index_without_a_weight_map(tmp_path, tiny_state, weight_map):
    folder = write_sharded_safetensors(tmp_path / "m", tiny_state)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="not a valid shard index") as info:
        analyze(folder)
    one_line_error(info, index)


def test_a_tensor_in_two_shards(tmp_path, tiny_state):
    folder = write_sharded_safetensors(tmp_path / "m", tiny_state)
    (folder / "model.safetensors.index.json").unlink()
    save_file({"fc1.weight": tiny_state["fc1.weight"] * 2}, folder / "model-stale.safetensors")
    with pytest.raises(CheckpointError, match="'fc1.weight' is in two files .*read as the shards of one model; pass one checkpoint file, or remove the stale shard") as info:
        analyze(folder)
    one_line_error(info, folder)


# --- FP8 ---------------------------------------------------------------------------------------------------

def fp8_case(tmp_path, weight: torch.Tensor, **companions: torch.Tensor) -> tuple[Path, torch.Tensor]:
    q = weight.to(torch.float8_e4m3fn)
    p = tmp_path / "fp8.safetensors"
    save_file({"layer.weight": q, **{f"layer.weight_{k}": v for k, v in companions.items()}}, p)
    return p, q.float()


def assert_rows_match(got, expected_weight, kind_name="layer"):
    ref = analyze({f"{kind_name}.weight": expected_weight})
    assert [r.name for r in got.layers] == [kind_name]
    for field in ("alpha", "lambda_max", "fnorm2"):
        assert getattr(got.layers[0], field) == pytest.approx(getattr(ref.layers[0], field), rel=1e-12), field


@pytest.mark.parametrize("layout", ["column_2d", "column_1d", "row_2d", "row_1d", "scalar", "elementwise"])
def test_fp8_scales_per_row_column_or_tensor(tmp_path, layout):
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    scale = {"column_2d": torch.rand(1, 64), "column_1d": torch.rand(64), "row_2d": torch.rand(96, 1),
             "row_1d": torch.rand(96), "scalar": torch.rand(()), "elementwise": torch.rand(96, 64)}[layout] + 0.5
    p, q = fp8_case(tmp_path, w, scale=scale)
    expected = q * (scale.reshape(96, 1) if layout == "row_1d" else scale)
    assert_rows_match(analyze(p), expected)


def test_fp8_square_weight_with_1d_scale_is_per_row(tmp_path):
    torch.manual_seed(1)
    scale = torch.rand(64) + 0.5
    p, q = fp8_case(tmp_path, torch.randn(64, 64), scale=scale)
    assert_rows_match(analyze(p), q * scale.reshape(64, 1))
    assert analyze(p).layers[0].alpha != pytest.approx(analyze({"l.weight": q * scale}).layers[0].alpha, rel=1e-6)


@pytest.mark.parametrize("scale_shape", [(5,), (96, 2), (2, 64), (96, 64, 1), (3, 32)])
def test_fp8_scale_of_unknown_layout_is_refused(tmp_path, scale_shape):
    p, _ = fp8_case(tmp_path, torch.randn(96, 64), scale=torch.rand(scale_shape))
    with pytest.raises(TbdiagError, match="weight_scale has shape .*FP8 layout is unknown") as info:
        analyze(p)
    one_line_error(info, p)


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (12, 8, 3), (4, 16, 8, 2, 2), (96, 64)])
def test_fp8_without_a_scale_is_refused_at_any_rank(tmp_path, shape):
    p, _ = fp8_case(tmp_path, torch.randn(shape))
    with pytest.raises(TbdiagError, match="without a layer.weight_scale_inv or layer.weight_scale companion") as info:
        analyze(p)
    one_line_error(info, p)
    with pytest.raises(TbdiagError, match="no layers"):  # excluding the layer is the way out
        analyze(p, exclude=("layer",))


def test_fp8_moe_stack_without_a_scale_is_refused(tmp_path):
    p = tmp_path / "moe.safetensors"
    save_file({"mlp.experts.down_proj": torch.randn(4, 32, 16).to(torch.float8_e4m3fn)}, p)
    with pytest.raises(TbdiagError, match="without a mlp.experts.down_proj_scale_inv"):
        analyze(p)


def test_fp8_conv_with_per_channel_scale(tmp_path):
    torch.manual_seed(2)
    scale = torch.rand(16) + 0.5
    p, q = fp8_case(tmp_path, torch.randn(16, 8, 3, 3), scale=scale)
    assert_rows_match(analyze(p), q * scale.reshape(16, 1, 1, 1))
    with pytest.raises(TbdiagError, match="weight_scale_inv has shape .*not a block grid"):
        analyze(fp8_case(tmp_path, torch.randn(16, 8, 3, 3), scale_inv=torch.rand(1, 1))[0])
