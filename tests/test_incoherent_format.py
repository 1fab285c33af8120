"""The incoherent format: orthogonality of the seeded transforms, product against the NumPy reference,
byte size, metadata checks, save/load round trip."""
import numpy as np
import pytest

import quip
from conftest import inputs
from runtime.errors import UserError
from runtime.formats.base import activation_mode
from runtime.formats.incoherent import NONE, IncoherentTensor, KronOrthogonal, kron_sizes, transforms
from runtime.formats.uniform import UniformTensor
from runtime.checkpoints.packed_checkpoint import read_packed, save_packed
from runtime.kernels import incoherent_numba, uniform_int8_numba
from runtime.kernels.uniform_int8_numba import available_kernels


def dense(transform: KronOrthogonal) -> np.ndarray:
    """M [n, n] as a dense matrix: apply(x) = x Mᵀ, so M = apply(I)ᵀ."""
    return transform.apply(np.eye(transform.size, dtype=np.float32)).T.astype(np.float64)


def quantized(n_out=48, n_in=96, bits=2, seed=0):
    """A QuIP weight of a random problem: (IncoherentTensor, inputs x [5, in])."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_out, n_in)).astype(np.float32)  # [out, in]
    X = rng.standard_normal((n_in, 4 * n_in)) * rng.uniform(0.2, 3.0, (n_in, 1))  # [in, n]
    packed, _ = quip.quantize(W, X @ X.T / X.shape[1], quip.QuIPParams(bits, seed=seed))
    return packed, inputs(rng, 5, n_in)


@pytest.mark.parametrize("n, sizes", [(576, (24, 24)), (1536, (32, 48)), (96, (8, 12)), (97, (1, 97)), (1, (1, 1))])
def test_kron_sizes(n, sizes):
    assert kron_sizes(n) == sizes


@pytest.mark.parametrize("transpose", [False, True])
def test_large_inputs_take_the_row_kernel(transpose, monkeypatch):
    from runtime.formats import incoherent
    transform = KronOrthogonal.random(96, seed=4, side=1)
    x = inputs(96, 7, 96)  # [7, 96]: rows not a multiple of the threads
    whole = transform.apply(x, transpose)
    monkeypatch.setattr(incoherent, "SPLIT_FLOATS", 1)
    kernel = transform.apply(x, transpose)
    np.testing.assert_allclose(kernel, whole, rtol=0, atol=1e-6)
    np.testing.assert_allclose(kernel, x @ (dense(transform) if transpose else dense(transform).T), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [96, 97, 10])  # oblong Kronecker factors, a prime (a = 1)
@pytest.mark.parametrize("transpose", [False, True])
def test_transform_on_columns(n, transpose):
    # apply_to_columns(x) = M x (Mᵀ x): the columns of x as vectors, against the dense matrix
    transform = KronOrthogonal.random(n, seed=6, side=0)
    x = inputs(n + 1, n, 5)  # [n, 5]
    M = dense(transform)
    np.testing.assert_allclose(transform.apply_to_columns(x, transpose), (M.T if transpose else M) @ x, rtol=0,
                               atol=1e-5 * np.abs(x).max())


@pytest.mark.parametrize("n", [576, 96, 97, 10])
def test_transform_is_orthogonal(n):
    transform = KronOrthogonal.random(n, seed=3, side=0)
    M = dense(transform)
    np.testing.assert_allclose(M @ M.T, np.eye(n), rtol=0, atol=1e-5)
    x = inputs(n, 4, n)  # [4, n]
    np.testing.assert_allclose(transform.apply(transform.apply(x), transpose=True), x, rtol=0, atol=1e-5)
    np.testing.assert_allclose(transform.apply(transform.apply(x, transpose=True)), x, rtol=0, atol=1e-5)
    np.testing.assert_allclose(transform.apply(x, transpose=True), x @ M, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [576, 96, 5632, 97, 10, 1])  # square, oblong (88 wide: padded), prime (a = 1)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("rows", [None, 1, 5])  # None: one row [n] (decode); else [rows, n] over the threads
def test_row_kernels_equal_the_transform(n, transpose, rows):
    # incoherent_numba.transform against KronOrthogonal.apply: scale on the input, sum(shift_of) * add on top
    transform = KronOrthogonal.random(n, seed=5, side=1)
    shape = (n,) if rows is None else (rows, n)
    v, shift_of = inputs(n, *shape), inputs(n + 3, *shape[:-1], 7)
    scale, add = inputs(n + 1, n, mean=2.0), inputs(n + 2, n)
    factors = transform.kernel_factors(transpose)
    no_shift = NONE.reshape(*shape[:-1], 0)
    plain = incoherent_numba.transform(v, incoherent_numba.row_transform(factors), no_shift)
    np.testing.assert_allclose(plain, transform.apply(v, transpose), rtol=0, atol=1e-5 * np.abs(v).max())
    scaled = incoherent_numba.transform(v, incoherent_numba.row_transform(factors, scale=scale), no_shift)
    expected = transform.apply(v * scale, transpose)
    np.testing.assert_allclose(scaled, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    shifted = incoherent_numba.transform(v, incoherent_numba.row_transform(factors, add=add), shift_of)
    expected = transform.apply(v + shift_of.sum(axis=-1, keepdims=True) * add, transpose)
    np.testing.assert_allclose(shifted, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("mode", ["float", "int8"])
def test_one_row_product_equals_the_reference(mode, monkeypatch):
    # the decode step's product of q/k/v-like parts: the kernels' transforms around each inner product
    monkeypatch.setenv("QLLM_ACTIVATIONS", mode)
    parts = [quantized(seed=s)[0] for s in (1, 2)] + [quantized(n_out=20, seed=3)[0]]
    x = inputs(9, 96)
    product = parts[0].one_row_product(parts)
    calls = []
    monkeypatch.setattr(uniform_int8_numba, "run", lambda call, v, run=uniform_int8_numba.run: calls.append(v.shape)
                        or run(call, v))
    ys = product(x)
    assert calls == ([(3, 96)] if mode == "int8" else [])  # int8: the three inner products in one call
    for y, part in zip(ys, parts):
        integer = part.inner.int8_decodes(*activation_mode())
        reference = (part.matmul_reference_int8 if integer else part.matmul_reference)(x[None])[0]  # [out]
        np.testing.assert_allclose(y, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
    assert parts[0].one_row_product([parts[0], quantized()[0].inner]) is None  # another format: one by one


def test_transforms_depend_only_on_seed_size_and_side():
    U, V = transforms((96, 96), seed=7)
    U2, V2 = transforms((96, 96), seed=7)
    np.testing.assert_array_equal(dense(U), dense(U2))
    np.testing.assert_array_equal(dense(V), dense(V2))
    assert np.abs(dense(U) - dense(V)).max() > 0.1  # the two sides are independent draws
    assert np.abs(dense(transforms((96, 96), seed=8)[1]) - dense(V)).max() > 0.1


def test_dequantize_is_the_papers_post_processing():
    # Algorithm 2: W = Uᵀ Ŵ V D⁻¹, with U, V, D as dense matrices
    packed, _ = quantized()
    U, V = (dense(t) for t in transforms(packed.shape, packed.seed))
    expected = U.T @ packed.processed().astype(np.float64) @ V / packed.rescale.astype(np.float64)
    np.testing.assert_allclose(packed.dequantize(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rows", [1, 5])
def test_matmul_matches_reference(bits, rows):
    packed, x = quantized(bits=bits, seed=bits)
    y = packed.matmul(x[:rows])
    reference = x[:rows] @ packed.dequantize().T  # [rows, out]
    assert y.dtype == np.float32 and y.shape == (rows, 48)
    # where the CPU has SIMD tiles (one row) or VNNI (several rows) the inner product multiplies two-byte
    # activations: about 3e-5 of the largest output from the float reference, float32 order from the int8 one
    integer = packed.inner.int8_decodes(*activation_mode()) and (rows == 1 or "avx512vnni" in available_kernels())
    tol = 1e-4 if integer else 1e-5
    np.testing.assert_allclose(y, reference, rtol=0, atol=tol * np.abs(reference).max())
    if integer:
        int8_reference = packed.matmul_reference_int8(x[:rows])  # [rows, out]
        np.testing.assert_allclose(y, int8_reference, rtol=0, atol=1e-5 * np.abs(int8_reference).max())
    leading = packed.matmul(x[:4].reshape(2, 2, 96))  # [2, 2, out] leading axes kept
    np.testing.assert_allclose(leading.reshape(4, 48), packed.matmul(x[:4]), rtol=0, atol=1e-6)


def test_byte_size():
    packed, _ = quantized(n_out=64, n_in=128)
    inner = packed.inner
    assert packed.nbytes == inner.nbytes + 2 * 128  # the inner arrays and rescale (float16 [in])
    # inner: per-tensor symmetric 2-bit uniform, one group: qweight + qzeros + scales + g_idx
    assert inner.nbytes == 4 * 64 * 2 * 4 + 4 * 1 * 2 * 2 + 2 * 64 + 4 * 128
    assert packed.bits_per_weight == pytest.approx(8 * packed.nbytes / (64 * 128))


def test_save_load_round_trip(tmp_path):
    packed, x = quantized()
    save_packed(tmp_path, {"quantization": {"method": "quip"}}, {"layer.w": packed, "norm": np.ones(3, np.float32)})
    loaded = read_packed(tmp_path)
    w = loaded["layer.w"]
    assert isinstance(w, IncoherentTensor) and w.meta() == packed.meta()
    for name, array in packed.tensors().items():
        np.testing.assert_array_equal(w.tensors()[name], array, err_msg=name)
    np.testing.assert_array_equal(w.matmul(x), packed.matmul(x))


def test_metadata_mismatch_raises_user_error():
    packed, _ = quantized()
    tensors, meta = packed.tensors(), packed.meta()
    with pytest.raises(UserError, match="lacks seed"):
        IncoherentTensor.from_tensors(tensors, {k: v for k, v in meta.items() if k != "seed"})
    with pytest.raises(UserError, match="shape"):
        IncoherentTensor.from_tensors(tensors, dict(meta, shape=[1, 2]))
    with pytest.raises(UserError, match="unexpected arrays"):
        IncoherentTensor.from_tensors(dict(tensors, extra=np.zeros(1)), meta)
    with pytest.raises(UserError, match="rescale must be float16"):
        IncoherentTensor.from_tensors(dict(tensors, rescale=np.ones(5, np.float16)), meta)
    asymmetric = UniformTensor.from_codes(np.zeros((4, 32), np.uint8), np.ones((1, 4)), np.zeros((1, 4), np.int32),
                                          bits=2, group_size=-1, sym=False)
    with pytest.raises(UserError, match="midrise"):
        IncoherentTensor(asymmetric, np.ones(32, np.float16), seed=0, midrise=True)


@pytest.mark.gpu
def test_cuda_matches_cpu(cupy):
    packed, x = quantized(n_out=96, n_in=576, bits=3)
    on_gpu = packed.to_device(cupy)
    for rows in (1, 5):
        y = on_gpu.matmul(cupy.asarray(x[:rows]))
        assert isinstance(y, cupy.ndarray)
        reference = packed.matmul_reference(x[:rows])
        np.testing.assert_allclose(cupy.asnumpy(y), reference, rtol=0, atol=1e-4 * np.abs(reference).max())
    np.testing.assert_array_equal(on_gpu.to_device(np).dequantize(), packed.dequantize())
