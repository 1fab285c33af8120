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
// uniform_matvec_<BITS>_r<ROWS>_v<VEC>: for m <= ROWS input rows (decode, small batches),
//   y[i, n] += sum over runs r of s[g, n] * (sum_k code(r, k, n) * x[i, 32 r + k] - z[g, n] * X[i, r]),
//   X[i, r] = sum_k x[i, 32 r + k]. Block = 32 x RUN_SPLIT threads: each lane owns VEC consecutive output
//   columns (VEC = 4: one 16-byte load per qweight row reads four columns' words; a warp reads 512
//   contiguous bytes), each thread row (threadIdx.y) strides over the runs of the block's slice of the
//   input (blockIdx.y), so the weights are read once for all m rows. The slice of x [m, n_in] in storage
//   order (gathered by perm when has_perm: act-order; zeros past m rows and past the input) and its run
//   sums X are staged in shared memory first (slice_runs runs per row: the launcher's upper bound of a
//   slice). A code becomes its float exactly as the low mantissa bits of
//   2^23 (one OR, one subtract: no integer-to-float conversion). The thread rows' sums meet in shared
//   memory, then one atomicAdd per (row, column) into y (zeroed by the caller).
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

// the 32 codes of one run of VEC columns as exact floats, from its BITS words per column (words[t][c])
template <int BITS, int VEC>
__device__ __forceinline__ float code_float(const unsigned int (&words)[BITS][VEC], int k, int c)
{
    const int w = (k * BITS) >> 5;
    const int off = (k * BITS) & 31;
    unsigned int v = words[w][c] >> off;
    if (off + BITS > 32) v |= words[w + 1][c] << (32 - off);
    return __int_as_float(0x4B000000u | (v & ((1u << BITS) - 1u))) - 8388608.0f;  // 2^23 + code - 2^23
}

template <int BITS, int ROWS, int VEC>
__device__ void matvec(const unsigned int* __restrict__ qweight, const unsigned int* __restrict__ qzeros,
                       const unsigned short* __restrict__ scales, const float* __restrict__ x,
                       const int* __restrict__ perm, float* __restrict__ y, int m, int n_in, int has_perm,
                       int n_runs, int n_out, int zero_words, int group_runs, int slice_runs)
{
    extern __shared__ float shared[];
    float* xs = shared;                                // [ROWS][slice_runs * RUN] the slice of x
    float* run_sums = shared + ROWS * slice_runs * RUN;  // [ROWS][slice_runs] X of each run
    __shared__ float partial[RUN_SPLIT][32 * VEC];     // one row's thread-row sums per column
    const int tid = threadIdx.y * 32 + threadIdx.x;
    const int n0 = (blockIdx.x * 32 + threadIdx.x) * VEC;
    int run0, run1;
    block_slice(n_runs, run0, run1);
    const int slice_len = (run1 - run0) * RUN;
    for (int i = tid; i < ROWS * slice_runs * RUN; i += 32 * RUN_SPLIT) {
        const int r = i / (slice_runs * RUN), j = i % (slice_runs * RUN);
        const int position = run0 * RUN + j;  // in storage order
        xs[i] = (r < m && j < slice_len && position < n_in)
                    ? x[(long long)r * n_in + (has_perm ? perm[position] : position)] : 0.0f;
    }
    __syncthreads();
    for (int i = tid; i < ROWS * slice_runs; i += 32 * RUN_SPLIT) {
        const float* xr = xs + i * RUN;  // row i / slice_runs, run i % slice_runs
        float total = 0.0f;
#pragma unroll
        for (int k = 0; k < RUN; ++k) total += xr[k];
        run_sums[i] = total;
    }
    __syncthreads();
    float acc[ROWS][VEC];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int c = 0; c < VEC; ++c) acc[r][c] = 0.0f;
    if (n0 < n_out) {
        for (int run = run0 + threadIdx.y; run < run1; run += RUN_SPLIT) {
            unsigned int words[BITS][VEC];
#pragma unroll
            for (int t = 0; t < BITS; ++t) {
                const unsigned int* row = qweight + (long long)(run * BITS + t) * n_out + n0;
                if constexpr (VEC == 4) {
                    const uint4 four = *reinterpret_cast<const uint4*>(row);  // 16-byte aligned: out % 4 == 0
                    words[t][0] = four.x;
                    words[t][1] = four.y;
                    words[t][2] = four.z;
                    words[t][3] = four.w;
                } else {
                    words[t][0] = row[0];
                }
            }
            const int local = run - run0;
            float dot[ROWS][VEC];
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
#pragma unroll
                for (int c = 0; c < VEC; ++c) dot[r][c] = 0.0f;
#pragma unroll
            for (int k = 0; k < RUN; ++k) {
                float code[VEC];
#pragma unroll
                for (int c = 0; c < VEC; ++c) code[c] = code_float<BITS, VEC>(words, k, c);
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    const float xk = xs[(r * slice_runs + local) * RUN + k];  // the same address across the warp
#pragma unroll
                    for (int c = 0; c < VEC; ++c) dot[r][c] = fmaf(code[c], xk, dot[r][c]);
                }
            }
            const int g = run / group_runs;
#pragma unroll
            for (int c = 0; c < VEC; ++c) {
                const float s = half_to_float(scales[(long long)g * n_out + n0 + c]);
                const float z = packed_code(qzeros + (long long)g * zero_words, n0 + c, BITS);
#pragma unroll
                for (int r = 0; r < ROWS; ++r)
                    acc[r][c] = fmaf(s, dot[r][c] - z * run_sums[r * slice_runs + local], acc[r][c]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int c = 0; c < VEC; ++c) partial[threadIdx.y][threadIdx.x * VEC + c] = acc[r][c];
        __syncthreads();
        if (threadIdx.y == 0 && r < m) {
#pragma unroll
            for (int c = 0; c < VEC; ++c) {
                float total = 0.0f;
#pragma unroll
                for (int t = 0; t < RUN_SPLIT; ++t) total += partial[t][threadIdx.x * VEC + c];
                if (n0 + c < n_out) atomicAdd(y + (long long)r * n_out + n0 + c, total);
            }
        }
        __syncthreads();
    }
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

#define UNIFORM_MATVEC(BITS, ROWS, VEC)                                                                       \
    extern "C" __global__ void uniform_matvec_##BITS##_r##ROWS##_v##VEC(                                       \
        const unsigned int* qweight, const unsigned int* qzeros, const unsigned short* scales, const float* x,  \
        const int* perm, float* y, int m, int n_in, int has_perm, int n_runs, int n_out, int zero_words,       \
        int group_runs, int slice_runs)                                                                       \
    {                                                                                                         \
        matvec<BITS, ROWS, VEC>(qweight, qzeros, scales, x, perm, y, m, n_in, has_perm, n_runs, n_out,       \
                                zero_words, group_runs, slice_runs);                                          \
    }

#define UNIFORM_KERNELS(BITS)                                                                                 \
    UNIFORM_MATVEC(BITS, 1, 1) UNIFORM_MATVEC(BITS, 2, 1) UNIFORM_MATVEC(BITS, 4, 1) UNIFORM_MATVEC(BITS, 8, 1) \
    UNIFORM_MATVEC(BITS, 1, 4) UNIFORM_MATVEC(BITS, 2, 4) UNIFORM_MATVEC(BITS, 4, 4) UNIFORM_MATVEC(BITS, 8, 4) \
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
