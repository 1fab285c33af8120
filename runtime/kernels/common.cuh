// Device helpers shared by this folder's CUDA sources (included as "common.cuh"; see cuda_source.py).
#ifndef QLLM_COMMON_CUH
#define QLLM_COMMON_CUH

// float32 of an IEEE half given as its 16 bits (PTX conversion: no cuda_fp16.h, whose copy under
// NVRTC depends on the CuPy / CUDA versions)
__device__ __forceinline__ float half_to_float(unsigned short bits)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
}

// the `bits`-bit code of entry n in a row of codes packed along the row as one little-endian bit stream
// (uniform's zero points, SpQR's statistic codes; any width up to 25 bits)
__device__ __forceinline__ float packed_code(const unsigned int* __restrict__ row, int n, int bits)
{
    const int p = n * bits;
    const int w = p >> 5;
    const int off = p & 31;
    unsigned int v = row[w] >> off;
    if (off + bits > 32) v |= row[w + 1] << (32 - off);
    return (float)(v & ((1u << bits) - 1u));
}

// The items [first, end) of this block's slice of n_items (the runs or half runs of the input): gridDim.y
// slices of per_slice items (the last ones short or empty); blockIdx.y picks the slice.
__device__ __forceinline__ void block_slice(int n_items, int& first, int& end)
{
    const int per_slice = (n_items + gridDim.y - 1) / gridDim.y;
    first = blockIdx.y * per_slice;
    end = min(n_items, first + per_slice);
}

// The end of a column-per-thread matvec on blockDim = (32, SPLIT): each thread row's sum `acc` for column n
// meets the others in shared memory, and thread row 0 adds the column's total into y[n] (one atomicAdd: the
// grid's blocks along the input dimension add into the same y, zeroed by the caller).
template <int SPLIT>
__device__ __forceinline__ void add_column_sums(float (&partial)[SPLIT][32], float acc, float* y, int n, int n_out)
{
    partial[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && n < n_out) {
        float total = 0.0f;
#pragma unroll
        for (int t = 0; t < SPLIT; ++t) total += partial[t][threadIdx.x];
        atomicAdd(y + n, total);
    }
}

#endif  // QLLM_COMMON_CUH
