// CUDA kernels of the uniform format (RTN / GPTQ codes); layout and NumPy
// reference in runtime/formats/uniform.py, launchers in
// runtime/kernels/uniform_cuda.py, which passes RUN and RUN_SPLIT as -D
// defines (cuda_source.py).
//
// qweight: int32 [n_runs * BITS, out]; the 32 codes of run r of output column
// n are one little-endian bit stream over words qweight[r*BITS + t, n],
// t < BITS: code k sits at stream bits [k*BITS, (k+1)*BITS). qzeros packs the
// zero points of each group the same way along the output dimension
// ([n_groups, ceil(out/32) * BITS]); scales are float16 [n_groups, out], read as their bits.
// Rows are in storage order (act-order: the caller gathers x by perm), and
// run r belongs to group r / group_runs.
//
// uniform_matvec_<BITS>: y[n] += sum over runs r of
//     s[g, n] * (sum_k code(r, k, n) * x[32 r + k] - z[g, n] * sum_k x[32 r + k])
//   block = 32 x RUN_SPLIT threads: threadIdx.x picks the output column (a
//   warp reads 32 consecutive words of a qweight row: coalesced),
//   threadIdx.y strides over the runs of the block's slice of the input
//   (blockIdx.y); partial sums meet in shared memory, then one atomicAdd per
//   column into y (zeroed by the caller). x is padded with zeros to whole runs.
// uniform_dequantize_<BITS>: w[32 r + k, n] = (code - zero) * scale, one
//   thread per (run, column): storage-order W^T [n_runs*32, out] float32 for
//   a cuBLAS product (prefill).

#include "common.cuh"

// the 32 codes of one run, from its BITS words
template <int BITS>
__device__ __forceinline__ void unpack_run(const unsigned int (&words)[BITS], float (&codes)[RUN])
{
#pragma unroll
    for (int k = 0; k < RUN; ++k) {
        const int w = (k * BITS) >> 5;
        const int off = (k * BITS) & 31;
        unsigned int v = words[w] >> off;
        if (off + BITS > 32) v |= words[w + 1] << (32 - off);
        codes[k] = (float)(v & ((1u << BITS) - 1u));
    }
}

template <int BITS>
__device__ __forceinline__ void load_run(const unsigned int* __restrict__ qweight, int run, int n, int n_out,
                                         unsigned int (&words)[BITS])
{
#pragma unroll
    for (int t = 0; t < BITS; ++t) words[t] = qweight[(long long)(run * BITS + t) * n_out + n];
}

template <int BITS>
__device__ void matvec(const unsigned int* __restrict__ qweight, const unsigned int* __restrict__ qzeros,
                       const unsigned short* __restrict__ scales, const float* __restrict__ x, float* __restrict__ y,
                       int n_runs, int n_out, int zero_words, int group_runs)
{
    __shared__ float partial[RUN_SPLIT][32];  // add_column_sums
    const int n = blockIdx.x * 32 + threadIdx.x;
    int run0, run1;
    block_slice(n_runs, run0, run1);
    float acc = 0.0f;
    if (n < n_out) {
        for (int run = run0 + threadIdx.y; run < run1; run += RUN_SPLIT) {
            unsigned int words[BITS];
            float codes[RUN];
            load_run<BITS>(qweight, run, n, n_out, words);
            unpack_run<BITS>(words, codes);
            const float* xr = x + run * RUN;
            float dot = 0.0f, xsum = 0.0f;
#pragma unroll
            for (int k = 0; k < RUN; ++k) {
                const float xk = xr[k];  // the same address across the warp: a broadcast
                dot = fmaf(codes[k], xk, dot);
                xsum += xk;
            }
            const int g = run / group_runs;
            const float s = half_to_float(scales[(long long)g * n_out + n]);
            const float z = packed_code(qzeros + (long long)g * zero_words, n, BITS);
            acc = fmaf(s, dot - z * xsum, acc);
        }
    }
    add_column_sums(partial, acc, y, n, n_out);
}

template <int BITS>
__device__ void dequantize(const unsigned int* __restrict__ qweight, const unsigned int* __restrict__ qzeros,
                           const unsigned short* __restrict__ scales, float* __restrict__ w,
                           int n_runs, int n_out, int zero_words, int group_runs)
{
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    const int run = blockIdx.y;
    if (n >= n_out || run >= n_runs) return;
    unsigned int words[BITS];
    float codes[RUN];
    load_run<BITS>(qweight, run, n, n_out, words);
    unpack_run<BITS>(words, codes);
    const int g = run / group_runs;
    const float s = half_to_float(scales[(long long)g * n_out + n]);
    const float z = packed_code(qzeros + (long long)g * zero_words, n, BITS);
#pragma unroll
    for (int k = 0; k < RUN; ++k) w[(long long)(run * RUN + k) * n_out + n] = (codes[k] - z) * s;
}

#define UNIFORM_KERNELS(BITS)                                                                                 \
    extern "C" __global__ void uniform_matvec_##BITS(                                                          \
        const unsigned int* qweight, const unsigned int* qzeros, const unsigned short* scales, const float* x,         \
        float* y, int n_runs, int n_out, int zero_words, int group_runs)                                      \
    {                                                                                                         \
        matvec<BITS>(qweight, qzeros, scales, x, y, n_runs, n_out, zero_words, group_runs);                   \
    }                                                                                                         \
    extern "C" __global__ void uniform_dequantize_##BITS(                                                      \
        const unsigned int* qweight, const unsigned int* qzeros, const unsigned short* scales, float* w,              \
        int n_runs, int n_out, int zero_words, int group_runs)                                                \
    {                                                                                                         \
        dequantize<BITS>(qweight, qzeros, scales, w, n_runs, n_out, zero_words, group_runs);                  \
    }

UNIFORM_KERNELS(2)
UNIFORM_KERNELS(3)
UNIFORM_KERNELS(4)
UNIFORM_KERNELS(8)
