// y = W x for one input row and a float weight W [out, in] (float16 or float32, row-major) on the GPU:
// the product a decode step captured as a CUDA graph runs for float weights, since CuPy refuses cuBLAS
// calls during stream capture (runtime/cuda_graph_step.py). Launcher: runtime/kernels/float_gemv_cuda.py,
// which passes WARPS_PER_BLOCK as a -D define.
//
// One warp per output row o: where the row is 16 bytes aligned (`vector`) each lane reads 16 bytes of it
// at a time (8 float16 or 4 float32 weights), else one weight at a time; products summed in float32, the
// lanes' sums added with shuffles. y[o] = sum_i W[o, i] * x[i] (x float32 [in]).

#include "common.cuh"

__device__ __forceinline__ float warp_sum(float v)
{
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

extern "C" __global__ void gemv_f16(const unsigned short* __restrict__ w, const float* __restrict__ x,
                                    float* __restrict__ y, int n_out, int n_in, int vector)
{
    const int o = blockIdx.x * WARPS_PER_BLOCK + threadIdx.y;
    if (o >= n_out) return;
    const unsigned short* row = w + (long long)o * n_in;
    float acc = 0.0f;
    int rest = 0;
    if (vector) {
        const uint4* row8 = reinterpret_cast<const uint4*>(row);
        const float4* x4 = reinterpret_cast<const float4*>(x);
        for (int v = threadIdx.x; v < n_in / 8; v += 32) {
            const uint4 eight = row8[v];
            const float4 a = x4[2 * v], b = x4[2 * v + 1];
            acc = fmaf(half_to_float(eight.x & 0xFFFFu), a.x, acc);
            acc = fmaf(half_to_float(eight.x >> 16), a.y, acc);
            acc = fmaf(half_to_float(eight.y & 0xFFFFu), a.z, acc);
            acc = fmaf(half_to_float(eight.y >> 16), a.w, acc);
            acc = fmaf(half_to_float(eight.z & 0xFFFFu), b.x, acc);
            acc = fmaf(half_to_float(eight.z >> 16), b.y, acc);
            acc = fmaf(half_to_float(eight.w & 0xFFFFu), b.z, acc);
            acc = fmaf(half_to_float(eight.w >> 16), b.w, acc);
        }
        rest = n_in / 8 * 8;
    }
    for (int i = rest + threadIdx.x; i < n_in; i += 32) acc = fmaf(half_to_float(row[i]), x[i], acc);
    acc = warp_sum(acc);
    if (threadIdx.x == 0) y[o] = acc;
}

extern "C" __global__ void gemv_f32(const float* __restrict__ w, const float* __restrict__ x,
                                    float* __restrict__ y, int n_out, int n_in, int vector)
{
    const int o = blockIdx.x * WARPS_PER_BLOCK + threadIdx.y;
    if (o >= n_out) return;
    const float* row = w + (long long)o * n_in;
    float acc = 0.0f;
    int rest = 0;
    if (vector) {
        const float4* row4 = reinterpret_cast<const float4*>(row);
        const float4* x4 = reinterpret_cast<const float4*>(x);
        for (int v = threadIdx.x; v < n_in / 4; v += 32) {
            const float4 four = row4[v], a = x4[v];
            acc = fmaf(four.x, a.x, acc);
            acc = fmaf(four.y, a.y, acc);
            acc = fmaf(four.z, a.z, acc);
            acc = fmaf(four.w, a.w, acc);
        }
        rest = n_in / 4 * 4;
    }
    for (int i = rest + threadIdx.x; i < n_in; i += 32) acc = fmaf(row[i], x[i], acc);
    acc = warp_sum(acc);
    if (threadIdx.x == 0) y[o] = acc;
}
