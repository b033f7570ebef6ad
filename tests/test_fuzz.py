"""Fuzzing the readers with damaged copies of the sample checkpoints and random JSON documents.

The invariant: a damaged input either gives the original result, or a result whose changed rows are not
``ok``, or a one-line `TbdiagError` — never another exception, never a different alpha with status ``ok``.

* Strict (every byte that describes the data rather than being it): truncations, byte flips in a
  safetensors header and its length field, header entries rewritten (shape, dtype, offsets), a tensor
  size enlarged inside a PyTorch pickle. A flip inside a tensor name may rename a layer (or make it no
  layer), so rows are compared by their numbers: every ``ok`` row must be an original row.
* Lenient (the bytes are the numbers, or a pickle whose sizes and strides nothing else repeats): flips in
  the data region of a safetensors file and anywhere in a PyTorch file may change numbers; they must
  still give a result or a `TbdiagError`.

Runs deterministically (``derandomize``) with example counts sized to finish in well under a minute.
"""

from __future__ import annotations

import itertools
import json
import math
import pickletools
import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tbdiag import analyze
from tbdiag.errors import TbdiagError
from tbdiag.analysis.export import read_analyses, to_json
from tbdiag.io.st_reader import DTYPE_BITS
from tbdiag.allocation.recommend import load_multipliers, recommend

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
# torch warns about the odd pickle protocol byte a flip can make; the warning is not what is tested here
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Hundreds of small eigensolves: one thread each is fastest, and immune to a busy machine's other load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fuzz(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None, report_multiple_bugs=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@dataclass(frozen=True)
class Sample:
    """A sample checkpoint: what to analyse (``source``) and the files in it that the cases damage."""

    source: str
    targets: tuple[str, ...]

    @property
    def safetensors(self) -> bool:
        return self.targets[0].endswith(".safetensors")


SAFETENSORS = [Sample("cnn_trained.safetensors", ("cnn_trained.safetensors",)),
               Sample("mlp_sharded", ("mlp_sharded/model-00001-of-00002.safetensors",
                                      "mlp_sharded/model-00002-of-00002.safetensors"))]
TORCH = [Sample("cnn_training_ckpt.pt", ("cnn_training_ckpt.pt",)), Sample("mlp_legacy.pth", ("mlp_legacy.pth",))]
ids = lambda s: s.source  # noqa: E731


def signature(row) -> tuple:
    """A row's numbers and status, ``nan`` as None (so that equal rows compare equal)."""
    nums = (row.alpha, row.D, row.xmin, row.lambda_max, row.fnorm2, row.stable_rank)
    return (row.kind, tuple(row.shape), row.status, row.n_evals, row.n_tail,
            *(None if math.isnan(x) else x for x in nums))


_original: dict[str, dict[str, tuple]] = {}


def original(sample: Sample) -> dict[str, tuple]:
    if sample.source not in _original:
        _original[sample.source] = {r.name: signature(r) for r in analyze(SAMPLES / sample.source, fit="median").layers}
        assert any(sig[2] == "ok" for sig in _original[sample.source].values())
    return _original[sample.source]


_cases = itertools.count()


def run_case(tmp_path: Path, sample: Sample, target: str, data: bytes, strict: bool) -> str:
    """Analyse ``sample`` with ``target`` replaced by ``data``; check the invariant; say what happened."""
    case = tmp_path / f"case{next(_cases)}"
    case.mkdir()
    try:
        if (SAMPLES / sample.source).is_dir():
            shutil.copytree(SAMPLES / sample.source, case / sample.source)
        (case / target).write_bytes(data)
        try:
            rows = analyze(case / sample.source, fit="median").layers
        except TbdiagError as exc:
            text = str(exc)
            assert "\n" not in text and str(case) in text, text
            return "error"
        got = {r.name: signature(r) for r in rows}
        if got == original(sample):
            return "same"
        if strict:
            known = set(original(sample).values())
            for name, sig in got.items():
                if sig[2] == "ok":
                    assert sig in known, (name, sig)  # a different alpha with status ok: wrong numbers
                    assert original(sample).get(name, sig) == sig, (name, sig)
        return "changed"
    finally:
        shutil.rmtree(case)


def pick(sample: Sample, data) -> tuple[str, bytes]:
    """One of the sample's files, and its bytes."""
    target = data.draw(st.sampled_from(sample.targets))
    return target, (SAMPLES / target).read_bytes()


def flipped(raw: bytes, begin: int, end: int, data) -> bytes:
    """``raw`` with one to three bytes in ``[begin, end)`` XORed with random masks."""
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        out[data.draw(st.integers(begin, end - 1))] ^= data.draw(st.integers(1, 255))
    return bytes(out)


def header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def pickle_region(path: Path) -> tuple[int, int]:
    """Byte range of the pickle that describes the tensors (sizes, strides, storages) in a PyTorch file."""
    data = path.read_bytes()
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(path) as z:
            info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
        assert info.compress_type == zipfile.ZIP_STORED
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
        return start, start + info.compress_size
    pos = 0
    for _ in range(5):  # legacy: magic number, protocol, sys info, the object, the storage keys; then raw storages
        *_, (op, _, at) = pickletools.genops(data[pos:])
        pos += at + 1
    return 0, pos


def encode_int(v: int) -> bytes:
    return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v) if v < 65536 else b"J" + struct.pack("<i", v)


def encode_shape(shape: tuple[int, ...]) -> bytes:
    items = b"".join(encode_int(s) for s in shape)
    return items + {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(shape)] if len(shape) <= 3 else b"(" + items + b"t"


# --- Checkpoint files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sample", SAFETENSORS + TORCH, ids=ids)
@fuzz(30)
@given(data=st.data())
def test_truncations(tmp_path, sample, data):
    target, raw = pick(sample, data)
    cut = data.draw(st.one_of(st.integers(0, len(raw) - 1), st.integers(len(raw) - 64, len(raw) - 1)))
    assert run_case(tmp_path, sample, target, raw[:cut], strict=True) == "error"


@pytest.mark.parametrize("sample", SAFETENSORS, ids=ids)
@fuzz(70)
@given(data=st.data())
def test_safetensors_header_byte_flips(tmp_path, sample, data):
    target, raw = pick(sample, data)
    run_case(tmp_path, sample, target, flipped(raw, 0, header_end(raw), data), strict=True)


@pytest.mark.parametrize("sample", SAFETENSORS, ids=ids)
@fuzz(30)
@given(data=st.data())
def test_safetensors_header_length_field(tmp_path, sample, data):
    target, raw = pick(sample, data)
    n = header_end(raw) - 8
    new = data.draw(st.one_of(st.integers(max(0, n - 16), n + 16), st.integers(0, 2 ** 64 - 1),
                              st.sampled_from([0, 1, len(raw) - 8, len(raw), 100_000_001])).filter(lambda v: v != n))
    assert run_case(tmp_path, sample, target, struct.pack("<Q", new) + raw[8:], strict=True) == "error"


@pytest.mark.parametrize("sample", SAFETENSORS, ids=ids)
@fuzz(40)
@given(data=st.data())
def test_safetensors_wrong_header_entries(tmp_path, sample, data):
    """A tensor's shape, dtype or data_offsets changed, the header re-written with a consistent length.

    Left out: changes the data cannot contradict (a shape with the same element count; a dtype of the same
    size that is a float either way, F16 ↔ BF16): such a header describes a valid file of other numbers.
    """
    target, raw = pick(sample, data)
    header = json.loads(raw[8:header_end(raw)])
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    entry = header[name]
    what = data.draw(st.sampled_from(["shape", "dtype", "data_offsets"]))
    if what == "shape":
        dim = data.draw(st.integers(0, len(entry["shape"])))
        shape = list(entry["shape"])
        if dim == len(shape):
            shape.append(data.draw(st.integers(0, 4)))  # one more dimension
        else:
            shape[dim] = data.draw(st.integers(0, 2 * shape[dim] + 2))
        assume_changed = math.prod(shape) != math.prod(entry["shape"])
        entry["shape"] = shape
    elif what == "dtype":
        bits = DTYPE_BITS[entry["dtype"]]
        entry["dtype"] = data.draw(st.sampled_from(sorted(d for d in DTYPE_BITS if DTYPE_BITS[d] != bits) + ["F33", "f32"]))
        assume_changed = True
    else:
        begin, end = entry["data_offsets"]
        new = [begin + data.draw(st.integers(-8, 8)), end + data.draw(st.integers(-8, 8))]
        entry["data_offsets"] = new
        assume_changed = new != [begin, end]
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    outcome = run_case(tmp_path, sample, target, struct.pack("<Q", len(body)) + body + raw[header_end(raw):], strict=True)
    assert outcome == "error" or not assume_changed


@pytest.mark.parametrize("sample", SAFETENSORS + TORCH, ids=ids)
@fuzz(30)
@given(data=st.data())
def test_byte_flips_in_data(tmp_path, sample, data):
    """Flips where the bytes are the numbers (or a pickle's sizes and strides): any result, or a clean error."""
    target, raw = pick(sample, data)
    start = header_end(raw) if sample.safetensors else 0
    run_case(tmp_path, sample, target, flipped(raw, start, len(raw), data), strict=False)


@pytest.mark.parametrize("sample", TORCH, ids=ids)
@fuzz(25)
@given(data=st.data())
def test_torch_pickle_byte_flips(tmp_path, sample, data):
    target, raw = pick(sample, data)
    run_case(tmp_path, sample, target, flipped(raw, *pickle_region(SAMPLES / target), data), strict=False)


@pytest.mark.parametrize("sample", TORCH, ids=ids)
@fuzz(20)
@given(data=st.data())
def test_torch_tensor_larger_than_its_storage(tmp_path, sample, data):
    """A size in the pickle enlarged beyond the tensor's storage: torch refuses it, and so must we."""
    target, raw = pick(sample, data)
    begin, end = pickle_region(SAMPLES / target)
    places = []
    for sig in original(sample).values():
        pattern = encode_shape(sig[1])
        places += [(at, sig[1]) for at in range(begin, end) if raw.startswith(pattern, at)]
    assert places  # the pattern search still finds the layers' sizes
    at, shape = data.draw(st.sampled_from(places))
    dim = data.draw(st.integers(0, len(shape) - 1))
    assume(shape[dim] < 255)  # one byte stays one byte
    bigger = data.draw(st.integers(shape[dim] + 1, 255))
    offset = at + sum(len(encode_int(s)) for s in shape[:dim]) + (1 if len(shape) > 3 else 0)
    mutated = raw[:offset] + encode_int(bigger) + raw[offset + 2:]
    assert run_case(tmp_path, sample, target, mutated, strict=True) == "error"


# --- JSON documents -----------------------------------------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-10 ** 400, 10 ** 400),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def mutate(doc, data):
    """``doc`` with one value somewhere inside replaced by random JSON, or one key or item removed."""
    if not isinstance(doc, (dict, list)) or not doc or data.draw(st.integers(0, 3)) == 0:
        return data.draw(JSON_VALUES)
    keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
    key = data.draw(st.sampled_from(keys))
    out = dict(doc) if isinstance(doc, dict) else list(doc)
    if data.draw(st.integers(0, 4)) == 0:
        del out[key]
    else:
        out[key] = mutate(out[key], data)
    return out


def check_reader(read, path: Path, doc) -> None:
    path.write_text(json.dumps(doc))
    try:
        read(path)
    except TbdiagError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), str(exc)


_docs: dict[str, object] = {}


def documents() -> dict[str, object]:
    if not _docs:
        analyses = [analyze(SAMPLES / "cnn_trained.safetensors", fit="median"), analyze(SAMPLES / "mlp_sharded")]
        _docs["analysis"] = json.loads(to_json(analyses[:1]))
        _docs["analyses"] = json.loads(to_json(analyses))
        _docs["multipliers"] = recommend(analyses[0], min_evals=5, include_first_last=True)
    return _docs


@fuzz(150)
@given(data=st.data())
def test_analysis_json_documents(tmp_path, data):
    doc = documents()[data.draw(st.sampled_from(["analysis", "analyses"]))]
    for _ in range(data.draw(st.integers(1, 3))):
        doc = mutate(doc, data)
    check_reader(read_analyses, tmp_path / "analysis.json", doc)


@fuzz(150)
@given(data=st.data())
def test_multiplier_json_documents(tmp_path, data):
    doc = documents()["multipliers"]
    for _ in range(data.draw(st.integers(1, 3))):
        doc = mutate(doc, data)
    check_reader(load_multipliers, tmp_path / "multipliers.json", doc)


def test_fuzz_documents_are_valid_before_mutation(tmp_path):
    """The unmutated inputs read back without error, so the cases above start from something valid."""
    for name in ("analysis", "analyses"):
        (tmp_path / f"{name}.json").write_text(json.dumps(documents()[name]))
        assert len(read_analyses(tmp_path / f"{name}.json")) == (1 if name == "analysis" else 2)
    (tmp_path / "m.json").write_text(json.dumps(documents()["multipliers"]))
    assert load_multipliers(tmp_path / "m.json")
    for sample in SAFETENSORS + TORCH:
        assert run_case(tmp_path, sample, sample.targets[0], (SAMPLES / sample.targets[0]).read_bytes(), True) == "same"
