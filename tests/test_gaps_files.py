"""Tests written against surviving mutants of benchmarks/mutation.sh (pruning/files.py): each checks a value a planted bug changes."""

from __future__ import annotations

import errno
import json
import os
import re

import pytest
from safetensors.torch import load_file

import tbdiag.pruning.files
from tbdiag.errors import TbdiagError
from tbdiag.pruning.core import prune
from tests.conftest import write_sharded_safetensors
from tests.test_gaps_outputs import ascii_locale_env
from tests.test_prune import mlp_state, saved


@pytest.mark.parametrize("existing", [False, True])
def test_a_folder_output_is_staged_in_a_hidden_folder_named_after_it(tmp_path, monkeypatch, existing):
    src = write_sharded_safetensors(tmp_path / "in", mlp_state())
    out = tmp_path / "out"
    if existing:
        out.mkdir()  # an empty folder: staged inside it, beside it otherwise
    staged = []
    real = tbdiag.pruning.files._write_folder

    def recording(tmp, *args, **kwargs):
        staged.append(tmp)
        return real(tmp, *args, **kwargs)

    monkeypatch.setattr(tbdiag.pruning.files, "_write_folder", recording)
    prune(src, out, sparsity=0.5, allocation="uniform")
    assert len(staged) == 1 and staged[0].parent == (out if existing else tmp_path).resolve()
    assert re.fullmatch(r"\.out\.\w{8}\.tmp", staged[0].name), staged[0].name  # a leftover says whose it was
    assert not staged[0].exists() and sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())


def test_a_folder_output_with_a_key_also_writes_the_allocation(tmp_path):
    state = mlp_state()
    flat = {**{f"ema.{k}": v.clone() for k, v in state.items()}, **{f"model.{k}": v for k, v in state.items()}}
    src = write_sharded_safetensors(tmp_path / "in", flat)
    out, doc = tmp_path / "out", tmp_path / "alloc.json"
    res = prune(src, out, sparsity=0.5, allocation="uniform", key="ema", allocation_json=doc)
    assert doc.read_text(encoding="utf-8") == res.to_json()
    assert json.loads(doc.read_text())["schema"] == "tbdiag.allocation/v1" and res.copied == ("config.json",)
    got = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert res.n_pruned == sum(int((v == 0).sum()) for k, v in got.items() if k.startswith("ema.")) > 0


@pytest.mark.parametrize("failing", ["weights", "allocation"])
def test_a_failed_write_names_the_file_it_was_writing(tmp_path, monkeypatch, failing):
    path = saved(tmp_path, mlp_state())
    out, doc = tmp_path / "out.safetensors", tmp_path / "alloc.json"
    real = tbdiag.pruning.files.fill
    victim = out if failing == "weights" else doc

    def disk_full(tmp, write):
        if tmp.name.startswith(f".{victim.name}."):  # the weights' error names no file, the allocation's its temporary
            raise OSError(errno.ENOSPC, "No space left on device", *([str(tmp)] if failing == "allocation" else []))
        real(tmp, write)

    monkeypatch.setattr(tbdiag.pruning.files, "fill", disk_full)
    with pytest.raises(TbdiagError) as exc:
        prune(path, out, sparsity=0.5, allocation="uniform", allocation_json=doc)
    assert str(exc.value) == (f"{victim}: cannot write (No space left on device); nothing was written; check the "
                              "disk and the folder's permissions")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


def test_a_staged_folder_that_cannot_be_removed_does_not_hide_why_the_write_failed(tmp_path, monkeypatch):
    src = write_sharded_safetensors(tmp_path / "in", mlp_state())
    out, doc = tmp_path / "out", tmp_path / "alloc.json"
    real_rmdir = os.rmdir

    def stuck(path, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        return real_rmdir(path, *args, **kwargs)

    def failing(temps):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tbdiag.pruning.files, "replace_all", failing)
    monkeypatch.setattr(os, "rmdir", stuck)
    with pytest.raises(TbdiagError) as exc:
        prune(src, out, sparsity=0.5, allocation="uniform", allocation_json=doc)
    assert str(exc.value).startswith(f"{out}: cannot write (No space left on device); nothing was written")
    assert not out.exists() and not doc.exists()


def test_a_utf8_shard_index_is_read_and_pruned_under_an_ascii_locale(tmp_path):
    """The index is JSON, UTF-8 by definition: read (and its pruned copy written) as UTF-8 whatever the locale."""
    import subprocess
    import sys

    src = write_sharded_safetensors(tmp_path / "in", mlp_state())
    index = next(src.glob("*.index.json"))
    doc = json.loads(index.read_text(encoding="utf-8"))
    doc["metadata"] = {"note": "modèle"}
    index.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    code = ("import sys, tbdiag; from tbdiag.pruning.core import prune; "
            "r = prune(sys.argv[1], sys.argv[2], sparsity=0.5, allocation='uniform'); print(r.n_pruned)")
    env = ascii_locale_env()
    done = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == prune(src, sparsity=0.5, allocation="uniform").n_pruned
    written = json.loads((tmp_path / "out" / index.name).read_text(encoding="utf-8"))
    assert written["metadata"]["note"] == "modèle"
