// CUDA kernels of the spqr format (SpQR, Dettmers et al. 2023, "SpQR: A
// Sparse-Quantized Representation for Near-Lossless LLM Weight Compression",
// §3.2, §4.2): layout and NumPy reference in runtime/formats/spqr.py, launchers
// in runtime/kernels/spqr_cuda.py, which passes RUN, HALF_RUN, RUN_SPLIT and
// FP16_STATS as -D defines (cuda_source.py); the outliers' CSR kernel is in
// sparse.cu.
//
// qweight: int32 [n_runs * BITS, out] as the uniform format's: the 32 codes of
// run r of output n are one little-endian bit stream over words
// qweight[r*BITS + t, n], t < BITS, code k at stream bits [k*BITS, (k+1)*BITS).
// A half run (16 codes, 16*BITS <= 64 bits) lies in one group (group sizes are
// multiples of 16), so it is read as one 64-bit value. Rows are in storage
// order (the caller gathers x by perm and pads it with zeros to whole runs).
//
// Statistics of group g, output n: with stat_bits 16, float16 scales / zeros
// [n_groups, out]; else stat_bits-bit codes packed along outputs
// ([n_groups, code_words]) and float16 step / low per block of stat_group
// outputs ([n_groups, n_blocks]): s = low + code * step (likewise z).
//
// spqr_matvec_<BITS>: y[n] += sum over half runs h of
//     s[g, n] * (sum_k code(h, k, n) * x[16 h + k] - z[g, n] * sum_k x[16 h + k]),  g = 16 h / group_size
//   block = 32 x RUN_SPLIT threads: threadIdx.x the output column (a warp reads
//   32 consecutive words: coalesced), threadIdx.y strides over the half runs
//   of the block's slice of the input (blockIdx.y); partial sums meet in
//   shared memory, then one atomicAdd per column into y (zeroed by the caller).
// spqr_dequantize_<BITS>: w[16 h + k, n] = (code - z) * s, one thread per
//   (half run, column): storage-order W_d^T [n_runs*32, out] float32 for a
//   cuBLAS product (prefill); half runs past the input are written as 0.
#include "common.cuh"

struct Stats {
    const unsigned int* scale_codes;
    const unsigned short* scale_step;
    const unsigned short* scale_low;
    const unsigned int* zero_codes;
    const unsigned short* zero_step;
    const unsigned short* zero_low;
    const unsigned short* scales;
    const unsigned short* zeros;
    int stat_bits, stat_group, code_words, n_blocks;
};

// decoded scale s and zero z of group g, output n
__device__ __forceinline__ void group_stats(const Stats& st, int g, int n, int n_out, float& s, float& z)
{
    if (st.stat_bits == FP16_STATS) {
        s = half_to_float(st.scales[(long long)g * n_out + n]);
        z = half_to_float(st.zeros[(long long)g * n_out + n]);
        return;
    }
    const long long gb = (long long)g * st.n_blocks + n / st.stat_group;
    const long long row = (long long)g * st.code_words;
    s = half_to_float(st.scale_low[gb])
        + packed_code(st.scale_codes + row, n, st.stat_bits) * half_to_float(st.scale_step[gb]);
    z = half_to_float(st.zero_low[gb])
        + packed_code(st.zero_codes + row, n, st.stat_bits) * half_to_float(st.zero_step[gb]);
}

// the 16*BITS bits of half run h of output n (code k at bits [k*BITS, (k+1)*BITS))
template <int BITS>
__device__ __forceinline__ unsigned long long half_bits(const unsigned int* __restrict__ qweight, int h, int n,
                                                        int n_out)
{
    const int start = (h & 1) * HALF_RUN * BITS;
    const int row = (h >> 1) * BITS + (start >> 5);
    const int off = start & 31;
    unsigned long long v = qweight[(long long)row * n_out + n];
    if (off + HALF_RUN * BITS > 32) v |= (unsigned long long)qweight[(long long)(row + 1) * n_out + n] << 32;
    return v >> off;
}

template <int BITS>
__device__ void matvec(const unsigned int* __restrict__ qweight, const Stats& st, const float* __restrict__ x,
                       float* __restrict__ y, int n_in, int n_out, int group_size)
{
    __shared__ float partial[RUN_SPLIT][32];  // add_column_sums
    const int n = blockIdx.x * 32 + threadIdx.x;
    const int n_halves = (n_in + HALF_RUN - 1) / HALF_RUN;
    int h0, h1;
    block_slice(n_halves, h0, h1);
    float acc = 0.0f;
    if (n < n_out) {
        for (int h = h0 + threadIdx.y; h < h1; h += RUN_SPLIT) {
            const unsigned long long v = half_bits<BITS>(qweight, h, n, n_out);
            const float* xh = x + h * HALF_RUN;
            float dot = 0.0f, xsum = 0.0f;
#pragma unroll
            for (int k = 0; k < HALF_RUN; ++k) {
                const float xk = xh[k];  // the same address across the warp: a broadcast
                dot = fmaf((float)((v >> (k * BITS)) & ((1u << BITS) - 1u)), xk, dot);
                xsum += xk;
            }
            float s, z;
            group_stats(st, h * HALF_RUN / group_size, n, n_out, s, z);
            acc = fmaf(s, dot - z * xsum, acc);
        }
    }
    add_column_sums(partial, acc, y, n, n_out);
}

template <int BITS>
__device__ void dequantize(const unsigned int* __restrict__ qweight, const Stats& st, float* __restrict__ w,
                           int n_in, int n_out, int group_size)
{
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    const int h = blockIdx.y;
    if (n >= n_out) return;
    float* wh = w + (long long)h * HALF_RUN * n_out + n;
    if (h * HALF_RUN >= n_in) {
#pragma unroll
        for (int k = 0; k < HALF_RUN; ++k) wh[(long long)k * n_out] = 0.0f;
        return;
    }
    const unsigned long long v = half_bits<BITS>(qweight, h, n, n_out);
    float s, z;
    group_stats(st, h * HALF_RUN / group_size, n, n_out, s, z);
#pragma unroll
    for (int k = 0; k < HALF_RUN; ++k)
        wh[(long long)k * n_out] = ((float)((v >> (k * BITS)) & ((1u << BITS) - 1u)) - z) * s;
}

#define STATS_PARAMS                                                                                          \
    const unsigned int *scale_codes, const unsigned short *scale_step, const unsigned short *scale_low,        \
        const unsigned int *zero_codes, const unsigned short *zero_step, const unsigned short *zero_low,       \
        const unsigned short *scales, const unsigned short *zeros, int stat_bits, int stat_group, int code_words, \
        int n_blocks
#define STATS_VALUE                                                                                           \
    Stats{scale_codes, scale_step, scale_low, zero_codes, zero_step, zero_low, scales, zeros,                 \
          stat_bits, stat_group, code_words, n_blocks}

#define SPQR_KERNELS(BITS)                                                                                    \
    extern "C" __global__ void spqr_matvec_##BITS(const unsigned int* qweight, STATS_PARAMS, const float* x,  \
                                                   float* y, int n_in, int n_out, int group_size)             \
    {                                                                                                         \
        matvec<BITS>(qweight, STATS_VALUE, x, y, n_in, n_out, group_size);                                    \
    }                                                                                                         \
    extern "C" __global__ void spqr_dequantize_##BITS(const unsigned int* qweight, STATS_PARAMS, float* w,    \
                                                       int n_in, int n_out, int group_size)                   \
    {                                                                                                         \
        dequantize<BITS>(qweight, STATS_VALUE, w, n_in, n_out, group_size);                                   \
    }

SPQR_KERNELS(2)
SPQR_KERNELS(3)
SPQR_KERNELS(4)
