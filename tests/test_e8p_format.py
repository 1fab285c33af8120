"""The e8p format (runtime/formats/e8p.py) and its Numba / CUDA kernels (QuIP#, Tseng et al. 2024).

The NumPy reference is checked against the convention written out with dense
Hadamard matrices; the kernels against the reference within a stated
floating-point tolerance; the byte size against the formula in the docstring;
a save / load round trip through runtime/packed_checkpoint.
"""
import numpy as np
import pytest

from conftest import assert_close, inputs
from runtime import e8p_codebook
from runtime.errors import UserError
from quipsharp import rht_matrix
from runtime.formats.e8p import E8PTensor, from_incoherent, pack_signs, unpack_signs
from runtime.hadamard import fast_hadamard, hadamard_matrix, random_signs
from runtime.kernels import e8p_numba
from runtime.checkpoints.packed_checkpoint import read_packed, save_packed

TOL = 2e-5  # kernel vs reference, per output: see assert_within_scale_bound
# (out, in): K = 12 on both sides, Paley sizes 20 / 12 with p = 1, powers of two, SmolLM2's 576 = 36 * 16
SHAPES = [(96, 192), (40, 24), (64, 128), (576, 576)]


def random_tensor(seed, n_out, n_in, bits, codebook="lexicographic"):
    """An E8PTensor with uniformly random codes (of a codebook variant), random signs and stage scales."""
    rng = np.random.default_rng(seed)
    codes = [rng.integers(0, np.iinfo(stage.code_dtype).max + 1, (n_out, n_in // 8)).astype(stage.code_dtype)
             for stage in e8p_codebook.stage_codebooks(bits)]
    scales = e8p_codebook.stage_scales(bits, rms=0.03)
    return E8PTensor.from_codes(codes, scales, random_signs(n_in, seed), random_signs(n_out, seed + 1), bits,
                                (n_out, n_in), codebook=codebook)


def assert_within_scale_bound(y, ref, x, packed):
    """Same shape, float32, and every |y - y_ref| <= TOL * ||x_row||_1 * max |Ŵ| + 1e-7.

    Not conftest's relative-norm assert_close: each output is held to the error that float32 sums in
    another order (through the two fast Hadamard transforms) can make on it, scaled by its own input
    row, so a wrong output in a row of small activations cannot hide in the norm of the others.
    """
    bound = TOL * np.abs(x).sum(axis=1, keepdims=True) * np.abs(packed.decoded()).max() + 1e-7
    assert y.shape == ref.shape and y.dtype == np.float32
    assert (np.abs(y - ref) <= bound).all(), float(np.abs(y - ref).max())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_reference_is_the_documented_product(bits):
    packed = random_tensor(bits, 96, 192, bits)
    h_in = hadamard_matrix(192).astype(np.float64) / np.sqrt(192)
    h_out = hadamard_matrix(96).astype(np.float64) / np.sqrt(96)
    s_in, s_out = packed.signs_in.astype(np.float64), packed.signs_out.astype(np.float64)
    w_hat = sum(scale * stage.decode(codes).reshape(96, 192).astype(np.float64)
                for scale, stage, codes in zip(packed.host_scales, e8p_codebook.stage_codebooks(bits), packed.stage_codes))
    expected = np.diag(s_out) @ h_out.T @ w_hat @ h_in @ np.diag(s_in)
    assert np.allclose(packed.dequantize(), expected, atol=1e-6)
    assert np.allclose(packed.decoded(), w_hat, atol=1e-7)


def test_incoherence_transforms():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    s_in, s_out = random_signs(24, 1), random_signs(40, 2)
    h_in = hadamard_matrix(24).astype(np.float64) / np.sqrt(24)
    h_out = hadamard_matrix(40).astype(np.float64) / np.sqrt(40)
    target = h_out @ np.diag(s_out) @ w @ np.diag(s_in) @ h_in.T
    assert np.allclose(rht_matrix(s_out) @ w @ rht_matrix(s_in).T, target, atol=1e-5)  # what quipsharp quantizes
    assert np.allclose(from_incoherent(target.astype(np.float32), s_in, s_out), w, atol=1e-5)
    x = rng.standard_normal((100, 24))
    hessian = x.T @ x / 100
    x_rot = fast_hadamard((x * s_in).astype(np.float32))  # inputs seen by Ŵ
    T_in = rht_matrix(s_in)
    assert np.allclose(T_in @ hessian @ T_in.T, x_rot.T @ x_rot / 100, atol=1e-5)  # quipsharp's Hessian


def test_signs_pack_lowest_bit_first():
    signs = np.array([-1, 1, 1, 1, 1, 1, 1, 1, 1, -1], dtype=np.float32)
    packed = pack_signs(signs)
    assert packed.tolist() == [1, 2]
    assert np.array_equal(unpack_signs(packed, 10), signs)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape, codebook", [(shape, "lexicographic") for shape in SHAPES] + [((96, 192), "quip-sharp")])
def test_numba_kernels_match_reference(bits, shape, codebook, monkeypatch):
    n_out, n_in = shape
    packed = random_tensor(10 * bits + n_in, n_out, n_in, bits, codebook)
    x = inputs(n_out, 5, n_in)
    ref = packed.matmul_reference(x)
    assert np.array_equal(e8p_numba.decode_rows(packed), packed.decoded())
    for rows in (1, 3):
        assert_within_scale_bound(e8p_numba.matmul_fused(packed, x[:rows]), ref[:rows], x[:rows], packed)
    assert_within_scale_bound(e8p_numba.matmul_prefill(packed, x), ref, x, packed)
    monkeypatch.setattr(e8p_numba, "PREFILL_TILE", 7 * n_in)  # several tiles, a short last one
    assert_within_scale_bound(e8p_numba.matmul_prefill(packed, x), ref, x, packed)


# 576 = 36·16 and 1536 = 12·128, 5632 = 44·128: the dense factor's vector kernel (one and several blocks of 16
# per row of the factor); 24 = 12·2: its scalar loop; 64, 2048: no dense factor; the butterflies: vectors of 16
# (n a multiple of 16), the scalar 8-point one (8) and stages of stride 2 (48 = 12·4)
@pytest.mark.parametrize("n, transpose", [(576, False), (576, True), (1536, True), (5632, False), (24, True),
                                          (64, False), (2048, True), (8, False), (48, True)])
def test_numba_hadamard_matches_fast_hadamard(n, transpose):
    rng = np.random.default_rng(n)
    before, after = random_signs(n, 1), random_signs(n, 2)
    for rows in (1, 9):  # one thread, then parallel over rows
        x = inputs(rng, rows, n)
        y = e8p_numba.hadamard_rows(x, n, before, after, transpose)
        assert np.allclose(y, fast_hadamard(x * before, transpose=transpose) * after, atol=1e-5)


def test_matmul_dispatch_and_leading_axes(monkeypatch):
    packed = random_tensor(7, 96, 192, 3)
    x = inputs(1, 2, 3, 192)
    y = packed.matmul(x)  # 6 rows: prefill path
    assert y.shape == (2, 3, 96)
    assert_within_scale_bound(y.reshape(6, 96), packed.matmul_reference(x.reshape(6, 192)), x.reshape(6, 192), packed)
    monkeypatch.setenv("QLLM_ACTIVATIONS", "float")
    y1 = packed.matmul(x[0, :1])  # 1 row, float activations: fused path
    assert_within_scale_bound(y1, packed.matmul_reference(x[0, :1]), x[0, :1], packed)
    monkeypatch.setenv("QLLM_ACTIVATIONS", "int8")
    y1 = packed.matmul(x[0, :1])  # 1 row: the int8 decode kernel where the CPU has VNNI
    reference = packed.matmul_reference_int8 if e8p_numba.int8_applies(packed) else packed.matmul_reference
    assert_close(y1, reference(x[0, :1]))


@pytest.mark.parametrize("bits, code_bits", [(2, 2), (3, 3), (4, 4)])
def test_byte_size(bits, code_bits):
    packed = random_tensor(1, 576, 1536, bits)
    n = 576 * 1536
    n_stages = 1 if bits == 2 else 2
    expected = code_bits * n / 8 + 4 * n_stages + 1536 / 8 + 576 / 8
    assert packed.nbytes == expected
    assert packed.bits_per_weight == pytest.approx(code_bits + (32 * n_stages + 1536 + 576) / n)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantized_gaussian_weight_error(bits):
    """RVQ codes of a Gaussian weight's incoherent form give about the codebook's Gaussian MSE."""
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((96, 192)) * 0.02).astype(np.float32)
    s_in, s_out = random_signs(192, 3), random_signs(96, 4)
    target = (rht_matrix(s_out) @ w @ rht_matrix(s_in).T).astype(np.float32)  # [96, 192]
    rms = float(np.sqrt(np.mean(target ** 2)))
    codes = e8p_codebook.rvq_encode(target.reshape(96, 24, 8), bits, rms=rms)
    packed = E8PTensor.from_codes(codes, e8p_codebook.stage_scales(bits, rms), s_in, s_out, bits, (96, 192))
    relative_mse = float(np.mean((packed.dequantize() - w) ** 2) / np.mean(w ** 2))
    assert relative_mse < {2: 0.1, 3: 0.033, 4: 0.0095}[bits]


@pytest.mark.parametrize("bits, codebook", [(2, "lexicographic"), (3, "lexicographic"), (4, "lexicographic"),
                                            (3, "quip-sharp")])
def test_save_load_round_trip(bits, codebook, tmp_path):
    packed = random_tensor(3, 40, 24, bits, codebook)
    save_packed(tmp_path, {"quantization": {"method": "quip"}}, {"layer.weight": packed,
                                                                "norm": np.ones(3, dtype=np.float32)})
    tensors = read_packed(tmp_path)
    loaded = tensors["layer.weight"]
    assert isinstance(loaded, E8PTensor) and loaded.meta() == packed.meta() and loaded.codebook == codebook
    assert ("codebook" in packed.meta()) == (codebook != "lexicographic")  # files of the default stay as they were
    for name, a in packed.tensors().items():
        assert np.array_equal(loaded.tensors()[name], a) and loaded.tensors()[name].dtype == a.dtype
    assert np.array_equal(loaded.dequantize(), packed.dequantize())


def test_bad_inputs_raise():
    packed = random_tensor(0, 40, 24, 3)
    arrays, meta = packed.tensors(), packed.meta()
    with pytest.raises(UserError, match="qweight_2"):
        E8PTensor.from_tensors({k: v for k, v in arrays.items() if k != "qweight_2"}, meta)
    with pytest.raises(UserError, match="metadata"):
        E8PTensor.from_tensors(arrays, dict(meta, hadamard_in=[24, 0]))
    with pytest.raises(UserError, match="lacks"):
        E8PTensor.from_tensors(arrays, {"bits": 3})
    with pytest.raises(UserError, match="multiple of 8"):
        E8PTensor(np.zeros((40, 3), dtype=np.uint16), arrays["stage_scales"], arrays["sign_in"],
                  arrays["sign_out"], bits=3, in_features=20, qweight_2=np.zeros((40, 3), dtype=np.uint8))
    with pytest.raises(UserError, match="size 6"):
        random_tensor(0, 6, 24, 2)
    with pytest.raises(UserError, match="2 code arrays"):
        E8PTensor.from_codes([packed.qweight], [1.0], random_signs(24, 0), random_signs(40, 0), 4, (40, 24))
    with pytest.raises(UserError, match="±1"):
        pack_signs(np.zeros(8))
    with pytest.raises(UserError, match="expects 24"):
        packed.matmul(np.zeros((1, 16), dtype=np.float32))
    with pytest.raises(UserError, match="codebook must be one of") as error:
        E8PTensor.from_tensors(arrays, dict(meta, codebook="e8p-v2"))
    assert "\n" not in str(error.value)


def test_codebook_variants_decode_the_same_codes_differently():
    """The variants share the code layout and 238 of 256 sources (in another order), so 238 · 256 points."""
    packed = random_tensor(5, 40, 24, 4)
    theirs = E8PTensor(**packed.tensors(), bits=4, in_features=24, codebook="quip-sharp")
    assert (packed.decoded() != theirs.decoded()).any()
    points = [set(map(tuple, e8p_codebook.codebook(v).tolist())) for v in e8p_codebook.VARIANTS]
    assert len(points[0]) == len(points[1]) == 1 << 16 and len(points[0] & points[1]) == 238 * 256


@pytest.mark.gpu
@pytest.mark.parametrize("bits, codebook", [(2, "lexicographic"), (3, "lexicographic"), (4, "lexicographic"),
                                            (3, "quip-sharp")])
def test_cuda_matches_reference(cupy, bits, codebook):
    from runtime.kernels import e8p_cuda

    for n_in in (1536, 96):  # rows of codes read 16 bytes at a time; 96: 12 groups a row, one code at a time
        packed = random_tensor(20 + bits, 576, n_in, bits, codebook)
        on_gpu = packed.to_device(cupy)
        assert np.array_equal(cupy.asnumpy(e8p_cuda.decoded(on_gpu)), packed.decoded())
        x = inputs(bits, 9, n_in)
        for rows in (1, 4, 9):  # fused kernels, then decode + cuBLAS
            y = on_gpu.matmul(cupy.asarray(x[:rows]))
            assert isinstance(y, cupy.ndarray)
            assert_within_scale_bound(cupy.asnumpy(y), packed.matmul_reference(x[:rows]), x[:rows], packed)


def test_a_file_with_the_hadamard_sizes_of_an_older_version_stops_with_one_line():
    """11008 inputs took a dense 5504 factor before GF(7³) gave K = 344 (runtime/hadamard.py): such a file's
    metadata no longer matches what its sizes give, and loading it says so instead of rotating by another
    matrix."""
    packed = random_tensor(30, 16, 11008, 2)
    assert packed.meta()["hadamard_in"] == [344, 5]
    old = dict(packed.meta(), hadamard_in=[5504, 1])
    with pytest.raises(UserError, match="Hadamard sizes"):
        E8PTensor.from_tensors(packed.tensors(), old)
