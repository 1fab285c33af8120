"""The counter-based dropout masks of training (runtime/kernels/dropout_numba.py)."""
import numpy as np

from runtime.kernels.dropout_numba import dropout_mask, stream_key

MASK64 = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
    """SplitMix64's output function in Python integers (Steele, Lea and Flood 2014)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_splitmix64_matches_its_published_first_output():
    # the first output of a SplitMix64 generator seeded with 1234567 (its reference implementation's state
    # is advanced by the golden gamma, then mixed)
    assert splitmix64_reference(1234567) == 6457827717110365317
    key = stream_key(1234567 ^ 0)  # one number: splitmix64(0 ^ 1234567)
    assert key == 6457827717110365317


def test_mask_entries_are_the_hash_of_key_and_index():
    key, p = stream_key(7, 3, 2), 0.05
    mask = dropout_mask((2, 50, 30), key, p)  # [2, 50, 30]
    threshold = round(p * (1 << 24))
    expected = [0.0 if splitmix64_reference((key + i) & MASK64) >> 40 < threshold else 1 / (1 - p) for i in range(3000)]
    np.testing.assert_array_equal(mask.reshape(-1), np.array(expected, dtype=np.float32))
    assert np.array_equal(dropout_mask((2, 50, 30), key, p), mask)  # the same stream again
    assert not np.array_equal(dropout_mask((2, 50, 30), stream_key(7, 3, 3), p), mask)  # another projection


def test_mask_rate_and_independence():
    mask = dropout_mask((1000, 1000), stream_key(0, 0, 0), 0.1)
    dropped = mask == 0
    assert abs(dropped.mean() - 0.1) < 5 * np.sqrt(0.1 * 0.9 / 1e6)  # within 5 standard errors
    both = (dropped[:, :-1] & dropped[:, 1:]).mean()  # neighbours dropped together: p² if independent
    assert abs(both - 0.01) < 5 * np.sqrt(0.01 * 0.99 / 1e6)
    assert np.allclose(mask[~dropped], 1 / 0.9)
