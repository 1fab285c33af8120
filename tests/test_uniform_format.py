"""The uniform format: AutoGPTQ bit order, pack/unpack, byte sizes, act-order, metadata checks."""
import numpy as np
import pytest

from conftest import inputs
from runtime.errors import UserError
from runtime.formats.uniform import UniformTensor, dequantize, group_index, pack, unpack

BITS = (2, 3, 4, 8)


def stream_words(codes, bits):
    """Independent definition of one packed run: the 32 codes as one Python-int bit stream, cut into words."""
    stream = sum(int(c) << (k * bits) for k, c in enumerate(codes))
    return [(stream >> (32 * i)) & 0xFFFFFFFF for i in range(bits)]


def random_tensor(rng, n_out, n_in, bits, group_size, sym=False, act_order=False):
    """A UniformTensor from random codes, float16 scales and zeros; also returns the raw parts."""
    n_groups = 1 if group_size == -1 else -(-n_in // group_size)
    codes = rng.integers(0, 2**bits, size=(n_out, n_in))  # [out, in]
    scales = rng.uniform(0.01, 0.1, size=(n_groups, n_out)).astype(np.float16)  # [n_groups, out]
    if sym:
        zeros = np.full((n_groups, n_out), 2 ** (bits - 1))  # [n_groups, out]
    else:
        zeros = rng.integers(0, 2**bits, size=(n_groups, n_out))  # [n_groups, out]
    g_idx = group_index(n_in, group_size)
    if act_order:
        g_idx = np.empty(n_in, dtype=np.int32)
        g_idx[rng.permutation(n_in)] = np.arange(n_in) // group_size  # column perm[i] in group i // G
    packed = UniformTensor.from_codes(codes, scales, zeros, bits=bits, group_size=group_size, sym=sym, g_idx=g_idx)
    return packed, codes, scales, zeros, g_idx


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [64, 67])
def test_pack_unpack_round_trip(bits, n):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(n, 5))  # [n, 5]
    packed = pack(codes, bits)
    assert packed.dtype == np.int32 and packed.shape == (-(-n // 32) * bits, 5)
    np.testing.assert_array_equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", BITS)
def test_bit_order_is_autogptq_stream(bits):
    codes = np.random.default_rng(0).integers(0, 2**bits, size=(32, 3))  # [32 rows, 3 columns]
    words = pack(codes, bits).view(np.uint32)  # [bits, 3]
    for col in range(3):
        assert list(words[:, col]) == stream_words(codes[:, col], bits)


def test_bit_order_literals():
    # first code in the lowest bits: rows 0..7 = 0..7 -> 0x76543210 (AutoGPTQ 4-bit)
    assert pack(np.arange(8)[:, None], 4).view(np.uint32)[0, 0] == 0x76543210
    assert pack(np.arange(4)[:, None], 8).view(np.uint32)[0, 0] == 0x03020100
    assert pack(np.array([[1], [2], [3]]), 2).view(np.uint32)[0, 0] == 0b111001
    # 3 bits: code 10 straddles words 0 and 1, code 21 words 1 and 2
    codes = np.zeros((32, 1), dtype=np.int64)
    codes[10] = 0b101
    codes[21] = 0b011
    words = pack(codes, 3).view(np.uint32)[:, 0]
    assert (words[0] >> 30) == 0b01 and (words[1] & 1) == 1  # code 10: bits 0-1, then bit 2
    assert (words[1] >> 31) == 1 and (words[2] & 3) == 0b01  # code 21: bit 0, then bits 1-2


@pytest.mark.parametrize("bits, group_size, n_out, n_in", [
    (4, 128, 576, 1536), (3, 128, 96, 576), (2, 32, 64, 256), (8, -1, 67, 200), (3, 64, 33, 100)])
def test_byte_size_formula(bits, group_size, n_out, n_in):
    packed = random_tensor(np.random.default_rng(1), n_out, n_in, bits, group_size)[0]
    n_groups = 1 if group_size == -1 else -(-n_in // group_size)
    expected = (4 * n_out * bits * -(-n_in // 32) + 4 * n_groups * bits * -(-n_out // 32)
                + 2 * n_groups * n_out + 4 * n_in)
    assert packed.nbytes == expected
    assert packed.bits_per_weight == pytest.approx(8 * expected / (n_in * n_out))
    if n_in % 32 == 0 and n_out % 32 == 0 and n_in % (n_in if group_size == -1 else group_size) == 0:
        g = n_in if group_size == -1 else group_size
        assert packed.bits_per_weight == pytest.approx(bits + (bits + 16) / g + 32 / n_out)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_is_code_minus_zero_times_scale(bits, act_order):
    packed, codes, scales, zeros, g_idx = random_tensor(np.random.default_rng(2), 33, 100, bits, 32,
                                                        act_order=act_order)
    expected = (codes - zeros[g_idx].T) * scales[g_idx].T.astype(np.float32)  # [out, in], original order
    np.testing.assert_array_equal(packed.dequantize(), expected.astype(np.float32))
    assert packed.act_order == act_order


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym, act_order, n_in", [(False, False, 100), (True, True, 96), (False, True, 128)])
def test_dequantize_cpu_equals_the_reference(bits, sym, act_order, n_in):
    """The Numba decoder training uses (`dequantize_cpu`, (c - z) s folded as c s - z s) equals the format's
    definition within float32 rounding, in original column order."""
    packed = random_tensor(np.random.default_rng(bits), 45, n_in, bits, 32, sym=sym, act_order=act_order)[0]
    fast, reference = packed.dequantize_cpu(), packed.dequantize()  # [out, in] each
    assert fast.shape == reference.shape == (45, n_in) and fast.dtype == np.float32
    assert np.abs(fast - reference).max() <= 1e-6 * np.abs(reference).max()


def test_act_order_storage_and_round_trip():
    packed, codes, _, _, g_idx = random_tensor(np.random.default_rng(3), 40, 128, 4, 32, act_order=True)
    perm = np.argsort(g_idx, kind="stable")
    np.testing.assert_array_equal(unpack(packed.qweight, 4, 128), codes.T[perm])  # rows in group order
    np.testing.assert_array_equal(np.asarray(packed.g_idx)[perm], np.arange(128) // 32)
    again = UniformTensor.from_tensors(packed.tensors(), packed.meta())
    np.testing.assert_array_equal(again.dequantize(), packed.dequantize())
    assert again.meta()["act_order"] is True


@pytest.mark.parametrize("bits, group_size, sym", [(4, 128, False), (3, -1, True), (2, 64, False)])
def test_from_tensors_round_trip(bits, group_size, sym):
    packed = random_tensor(np.random.default_rng(4), 48, 200, bits, group_size, sym=sym)[0]
    again = UniformTensor.from_tensors(dict(packed.tensors()), dict(packed.meta()))
    for name, a in packed.tensors().items():
        np.testing.assert_array_equal(again.tensors()[name], a)
    assert again.meta() == packed.meta()
    assert packed.meta() == {"bits": bits, "group_size": group_size, "sym": sym, "per_tensor": False,
                             "act_order": False, "in_features": 200, "out_features": 48}


def mismatches(packed):
    """(tensors, meta) pairs that each disagree with each other in one way."""
    tensors, meta = packed.tensors(), packed.meta()
    yield tensors, {**meta, "bits": 3}
    yield tensors, {**meta, "group_size": 64}
    yield tensors, {**meta, "in_features": 100}
    yield tensors, {**meta, "act_order": True}
    yield tensors, {**meta, "sym": True}  # its zeros are not the midpoint
    yield tensors, {k: v for k, v in meta.items() if k != "bits"}
    yield {**tensors, "scales": tensors["scales"].astype(np.float32)}, meta
    yield {**tensors, "qweight": tensors["qweight"][:-1]}, meta
    yield {k: v for k, v in tensors.items() if k != "g_idx"}, meta
    yield {**tensors, "perm": np.arange(128, dtype=np.int32)}, meta
    yield {**tensors, "g_idx": np.zeros(128, dtype=np.int32)}, meta  # 128 columns in one group of 32
    yield {**tensors, "scales": tensors["scales"][0]}, meta
    yield tensors, {**meta, "bits": "4"}
    yield tensors, {**meta, "sym": None}


def test_from_tensors_rejects_mismatched_metadata():
    packed = random_tensor(np.random.default_rng(5), 40, 128, 4, 32)[0]
    for tensors, meta in mismatches(packed):
        with pytest.raises(UserError, match="re-quantize"):
            UniformTensor.from_tensors(tensors, meta)


def test_per_tensor_is_one_broadcast_scale():
    zeros = np.full((1, 20), 3)
    scales = np.full((1, 20), 0.5, dtype=np.float16)
    codes = np.random.default_rng(6).integers(0, 16, size=(20, 64))
    packed = UniformTensor.from_codes(codes, scales, zeros, bits=4, group_size=-1, sym=False, per_tensor=True)
    np.testing.assert_array_equal(packed.dequantize(), ((codes - 3) * 0.5).astype(np.float32))
    scales[0, 1] = 0.25
    with pytest.raises(UserError, match="per_tensor"):
        UniformTensor.from_codes(codes, scales, zeros, bits=4, group_size=-1, sym=False, per_tensor=True)


@pytest.mark.parametrize("bits, group_size, code", [(5, 128, 0), (4, 48, 0), (4, 0, 0), (1, -1, 0), (4, -1, 16)])
def test_bad_parameters_raise_user_error(bits, group_size, code):
    with pytest.raises(UserError):
        UniformTensor.from_codes(np.full((4, 64), code), np.ones((1, 4)), np.zeros((1, 4)), bits=bits,
                                 group_size=group_size, sym=False)


def test_reference_functions_agree():
    packed = random_tensor(np.random.default_rng(7), 24, 96, 3, 32)[0]
    x = inputs(8, 2, 96)
    w = dequantize(packed.qweight, packed.qzeros, packed.scales, packed.g_idx, 3)
    np.testing.assert_allclose(packed.matmul_reference(x), x @ w.T, rtol=1e-6)
    with pytest.raises(UserError, match="features"):
        packed.matmul(np.zeros((1, 95), dtype=np.float32))
