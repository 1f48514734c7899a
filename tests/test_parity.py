"""Parity with torch.nn: outputs, final states and the gradients of input, h0, c0 and every
parameter, for every combination of cell × num_layers × bidirectional × bias × proj_size ×
hx given or not × input format (seq-first, batch_first, unbatched, packed sorted/unsorted) ×
dtype, on every backend. Kernel backends the machine cannot run are skipped with the reason.
"""
import itertools

import pytest
import torch

from _support import (BACKENDS, CELL_OF_VARIANT, FORMATS, VARIANTS, assert_all_close, make_case,
                      require, run_and_grad)

DTYPES = [torch.float32, torch.float64]
FULL = list(itertools.product(VARIANTS, FORMATS, [1, 2, 3], [False, True], [True, False],
                              [True, False], DTYPES))
# Triton has no float64: it runs the float32 half of the product (on the CPU interpreter in CI).
TRITON = [c for c in FULL if c[6] == torch.float32]
# "native" is torch.nn itself: comparing it with torch.nn over the whole product tests nothing. A
# handful of cases check only that the module routes to torch's own forward (dense and packed,
# bidirectional, two layers, given state) and hands back its results.
NATIVE = [c for c in FULL if c[1] in ("seq_first", "packed_unsorted") and c[2] == 2 and c[3]
          and c[4] and c[5] and c[6] == torch.float32]
CASES = {"triton": TRITON, "native": NATIVE}


def _params():
    """Ids start with the variant (the cell), then the backend: ``-k lstm`` selects one cell on
    every backend, ``-k numba`` one backend for every cell."""
    for backend in BACKENDS:
        for case in CASES.get(backend, FULL):
            v, fmt, layers, bidir, bias, hx, dtype = case
            cid = (f"{v}-{backend}-{fmt}-L{layers}-{'bi' if bidir else 'uni'}-"
                   f"{'bias' if bias else 'nobias'}-{'hx' if hx else 'nohx'}-{str(dtype)[6:]}")
            yield pytest.param(backend, *case, id=cid)


@pytest.mark.parametrize("backend,variant,fmt,num_layers,bidirectional,bias,with_hx,dtype",
                         list(_params()))
def test_parity_with_torch_nn(backend, variant, fmt, num_layers, bidirectional, bias, with_hx,
                              dtype):
    # Triton runs on the GPU where there is one (else under the interpreter on the CPU); the
    # expected values always come from torch.nn on the CPU (cuDNN's default TF32 is no oracle).
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    require(backend, CELL_OF_VARIANT[variant], dtype, device,
            VARIANTS[variant][2].get("proj_size", 0))
    ref, mod, leaves, build, weights = make_case(
        variant, fmt, num_layers, bidirectional, bias, with_hx, dtype, backend)
    expected_out, expected_grads = run_and_grad(ref, leaves, build, weights)
    out, grads = run_and_grad(mod.to(device), leaves, build, weights)
    assert_all_close(out, expected_out, dtype, "outputs")
    assert_all_close(grads, expected_grads, dtype, "gradients")
    if fmt.startswith("packed"):
        packed = mod(*build([t.to(device) for t in leaves]))[0]
        expected = ref(*build(leaves))[0]
        for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            a, e = getattr(packed, field), getattr(expected, field)
            assert (a is None and e is None) or torch.equal(a.cpu(), e), field
