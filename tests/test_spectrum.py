from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tbdiag.esd import spectrum
from tbdiag.errors import TbdiagError
from tbdiag.esd.layers import as_matrices
from tbdiag.esd.spectrum import eigenvalues, eigenvalues_svd, resolve_device


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (64, 64), (64, 32, 3, 3), (48, 16, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_gram_eigvalsh_matches_float64_svdvals(shape, dtype):
    torch.manual_seed(0)
    w = torch.randn(shape).to(dtype)
    kind = {2: "linear", 3: "conv1d", 4: "conv2d"}[len(shape)]
    mats = as_matrices(w, kind)
    ev = eigenvalues(mats)
    ref = eigenvalues_svd(mats.double())
    assert ev.shape == ref.shape and ev.dtype == torch.float64
    upper = slice(len(ref) // 2, None)
    assert torch.allclose(ev[upper], ref[upper], rtol=1e-6, atol=0)
    assert bool((ev[1:] >= ev[:-1]).all())


def test_conv_slices_pool_kernel_positions():
    w = torch.randn(64, 64, 3, 3)
    mats = as_matrices(w, "conv2d")
    assert mats.shape == (9, 64, 64)
    assert torch.equal(mats[4], w[:, :, 1, 1])
    assert len(eigenvalues(mats)) == 576


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TbdiagError, match="not a device"):
        resolve_device("gpu0")
    with pytest.raises(TbdiagError, match="only cpu and cuda"):
        resolve_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_gpu_is_a_clear_error():
    with pytest.raises(TbdiagError, match="no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(9, 256, 128), (2, 600, 530)])  # the second: three Gram panels
def test_cuda_eigenvalues_match_cpu(dtype, shape):
    torch.manual_seed(0)
    mats = torch.randn(shape).to(torch.bfloat16)
    cpu = eigenvalues(mats)
    gpu = eigenvalues(mats, "cuda", dtype).cpu().double()
    upper = slice(len(cpu) // 2, None)
    assert torch.allclose(gpu[upper], cpu[upper], rtol=1e-6 if dtype == torch.float64 else 1e-4)


def test_eigensolve_batches_give_the_same_pooled_spectrum(monkeypatch):
    torch.manual_seed(0)
    mats = torch.randn(7, 40, 30)
    whole = eigenvalues(mats)
    monkeypatch.setattr(spectrum, "BATCH_BYTES", 3 * 30 * 30 * 8 * 2)  # two matrices per batch
    assert spectrum.batch_matrices(30, torch.device("cpu"), torch.float64) == 2
    assert torch.allclose(eigenvalues(mats), whole, rtol=1e-12, atol=1e-12)
    mats[5, 3, 4] = float("inf")  # in the third batch: the whole pooled spectrum is nan
    assert bool(eigenvalues(mats).isnan().all())


def test_stack_eigensolves_shared_over_threads_match_one_call(monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(5, 90, 80, dtype=torch.float64)
    grams = w.mT @ w  # (5, 80, 80)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        calls = []
        monkeypatch.setattr(spectrum, "ThreadPoolExecutor", lambda n: calls.append(n) or ThreadPoolExecutor(n))
        monkeypatch.setattr(spectrum, "PARALLEL_MIN_WORK", 1)
        got = spectrum.eigvalsh_shared([grams[:2], grams[2:]])
        assert calls == [2] and torch.get_num_threads() == 2  # shared out, and the thread count restored
        assert torch.allclose(torch.cat(got), torch.linalg.eigvalsh(grams), rtol=1e-12, atol=1e-9)
    finally:
        torch.set_num_threads(before)


def test_cuda_blocks_and_batches_are_sized_to_free_memory(monkeypatch):
    free = 8 << 30  # a GPU with 8 GiB free (CUDA itself is not needed: only the sizing is checked)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 16 << 30))
    cuda = torch.device("cuda")
    assert spectrum.block_elements(cuda, torch.float64) == free // 4 // 8  # a quarter of it per Gram block
    assert spectrum.batch_matrices(4096, cuda, torch.float64) == (free // 2) // (3 * 4096 * 4096 * 8)  # 21
    assert spectrum.batch_matrices(65536, cuda, torch.float32) == 1  # never zero
    assert spectrum.block_elements(torch.device("cpu"), torch.float64) == spectrum.CHUNK_ELEMENTS
