"""QuIP# (quipsharp.py): RHT incoherence, BlockLDLQ onto E8P, proxy losses against QuIP and GPTQ, the e8p
tensor it produces (dequantize, save/load)."""
import numpy as np
import pytest

from conftest import assert_shared_hessian_equals_separate_calls
import gptq
import layerwise
import quip
import quipsharp
from runtime import e8p_codebook
from runtime.errors import UserError
from runtime.checkpoints.packed_checkpoint import read_packed, save_packed
from test_quip import coherence, outlier_problem


@pytest.fixture(scope="module")
def problem():
    # W [96, 256] with outliers, X, H. The 2-bit order QuIP# < QuIP < GPTQ holds for seeds 0-3 of this
    # problem (QuIP# below QuIP by 5-30%, QuIP below GPTQ by ~8x); seed 1 is one of them.
    return outlier_problem(seed=1)


@pytest.fixture(scope="module")
def results(problem):
    """bits -> (E8PTensor, stats, QuIPSharpResult) on the outlier problem."""
    W, _, H = problem
    out = {}
    for bits in (2, 3, 4):
        params = quipsharp.QuIPSharpParams(bits)
        packed, stats = quipsharp.quantize(W, H, params)
        out[bits] = packed, stats, quipsharp.quantize_codes(W, H, params)
    return out


def test_rht_spreads_outliers(problem):
    W, _, _ = problem
    signs_in, signs_out = (np.random.default_rng(s).choice([-1.0, 1.0], n) for s, n in ((0, 256), (1, 96)))
    T_in, T_out = quipsharp.rht_matrix(signs_in), quipsharp.rht_matrix(signs_out)
    np.testing.assert_allclose(T_in @ T_in.T, np.eye(256), rtol=0, atol=1e-12)  # orthogonal
    assert coherence(T_out @ W @ T_in.T) < coherence(W) / 4


def test_2bit_loss_below_quip_and_gptq(problem, results):
    W, _, H = problem
    _, stats, _ = results[2]
    _, quip_stats = quip.quantize(W, H, quip.QuIPParams(2))
    _, gptq_stats = gptq.quantize(W, H, gptq.GPTQParams(2, -1))
    assert stats["loss"] < quip_stats["loss"] < gptq_stats["loss"]
    assert stats["rtn_loss"] == pytest.approx(gptq_stats["rtn_loss"])


def test_more_bits_lower_loss(results):
    losses = [results[bits][1]["loss"] for bits in (2, 3, 4)]
    assert losses[0] > losses[1] > losses[2]
    assert all(results[bits][1]["ratio"] < 0.2 for bits in (2, 3, 4))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_stats_and_tensor_are_the_algorithms_result(problem, results, bits):
    W, X, H = problem
    packed, stats, result = results[bits]
    Q = packed.dequantize()
    np.testing.assert_allclose(Q, result.Q, rtol=0, atol=1e-5 * np.abs(result.Q).max())
    output_error = 2 / X.shape[1] * np.sum(((W - Q).astype(np.float64) @ X) ** 2)  # loss in the original space
    assert stats["loss"] == pytest.approx(output_error, rel=1e-6)
    assert [c.dtype for c in result.stage_codes] == [s.code_dtype for s in e8p_codebook.stage_codebooks(bits)]
    assert all(c.shape == (96, 256 // 8) for c in result.stage_codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_identity_hessian_gives_nearest_points(bits):
    # with H = I nothing is fed back: BlockLDLQ rounds each 8-vector of the processed weight on its own
    W, _, _ = outlier_problem(n_out=32, n_in=64)
    result = quipsharp.quantize_codes(W, np.eye(64), quipsharp.QuIPSharpParams(bits, percdamp=0.0))
    T_in, T_out = quipsharp.rht_matrix(result.sign_in), quipsharp.rht_matrix(result.sign_out)
    W_t = (T_out @ W.astype(np.float64) @ T_in.T).astype(np.float32).reshape(32, 8, 8)  # [out, in/8, 8]
    rms = result.stage_scales[0] / e8p_codebook.stage_scales(bits)[0]
    expected = e8p_codebook.rvq_encode(W_t, bits, rms)
    for codes, want in zip(result.stage_codes, expected):
        assert np.mean(codes == want) > 0.99  # float32 vs float64 rounding may flip a near-tie


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n_out", [40, 600])
def test_blockldlq_kernel_equals_the_numpy_loop(bits, n_out):
    # an E8PGrid runs each lazy batch in runtime/kernels/blockldlq_e8p_numba.py (600 rows: split over two
    # threads, each ending in a partial block of lanes); the same grid behind a lambda, the NumPy loop. The
    # fed-back sums run in float32 in another order, so a near-tie may round the other way: nearly all codes
    # agree, and the losses within 1e-6
    W, _, H = outlier_problem(n_out=n_out, n_in=320, seed=bits)  # two lazy batches and a short one
    grid = quipsharp.E8PGrid(bits, rms=float(np.sqrt(np.mean(W.astype(np.float64) ** 2))))
    values, codes, losses = layerwise.ldlq(W, H, grid, block=8)
    loop_values, loop_codes, loop_losses = layerwise.ldlq(W, H, lambda target: grid(target), block=8)
    assert codes.shape == loop_codes.shape == (len(e8p_codebook.STAGE_SCALES[bits]), n_out, 320 // 8)
    assert np.mean(codes == loop_codes) > 0.999
    same_rows = (codes == loop_codes).all(axis=(0, 2))  # [out]
    np.testing.assert_array_equal(values[same_rows], loop_values[same_rows])
    np.testing.assert_allclose(losses, loop_losses, rtol=1e-6)
    assert same_rows.mean() > 0.9


def test_shared_hessian_equals_separate_calls(problem):
    W, _, H = problem
    assert_shared_hessian_equals_separate_calls(quipsharp, W, H, quipsharp.QuIPSharpParams(2), 48)


def test_save_load_round_trip(tmp_path, results):
    packed = results[3][0]
    save_packed(tmp_path, {"quantization": {"method": "quipsharp"}}, {"layer.w": packed})
    loaded = read_packed(tmp_path)
    w = loaded["layer.w"]
    assert type(w) is type(packed) and w.meta() == packed.meta()
    for name, array in packed.tensors().items():
        np.testing.assert_array_equal(w.tensors()[name], array, err_msg=name)
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    np.testing.assert_array_equal(w.matmul(x), packed.matmul(x))


def test_bad_input_raises_user_error():
    with pytest.raises(UserError, match="multiple of 8"):
        quipsharp.quantize(np.ones((4, 60), np.float32), np.eye(60))
    with pytest.raises(UserError, match="bits"):
        quipsharp.quantize(np.ones((4, 64), np.float32), np.eye(64), quipsharp.QuIPSharpParams(bits=5))
    with pytest.raises(UserError, match="Hadamard"):
        quipsharp.quantize(np.ones((4, 184), np.float32), np.eye(184))  # 184 = 23 * 8: no Hadamard matrix
