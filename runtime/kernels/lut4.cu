// CUDA kernels of the lut4 format (QLoRA NF4 / FP4); layout and semantics in
// runtime/formats/lut4.py, launchers in runtime/kernels/lut4_cuda.py.
//
// qweight: uint8 [out, in/2], the first weight of each byte in the HIGH
// nibble; in % block_size == 0 and block_size % 8 == 0, so every row is a
// whole number of 32-bit words (8 codes) and no word straddles two blocks.
// Block `blk` (row-major over all of W) has absmax
//   plain:  absmax[blk]
//   dq:     dmap[absmax_q[blk]] * absmax_scale[blk / 256] + absmax_mean[0]
//
// lut4_matmul_fused: y[r, o] = sum_i table[code(o, i)] * absmax(o, i / B) * x[r, i]
//   one warp per (output row o, input row r); each lane reads one 32-bit
//   word (8 codes) and two float4 of x at a time; the 16-value table and the
//   256-value dynamic map live in shared memory.
// lut4_dequantize: W [out, in] float32, one thread per byte (two weights);
//   the caller multiplies the result with cuBLAS (prefill).
// WARPS_PER_BLOCK, DQ_BLOCK_SIZE: -D defines from runtime/kernels/lut4_cuda.py (cuda_source.py).

__device__ __forceinline__ float block_scale(long long blk, int dq, const float* absmax,
                                             const unsigned char* absmax_q, const float* s_dmap,
                                             const float* absmax_scale, const float* absmax_mean)
{
    if (!dq) return absmax[blk];
    // no fused multiply-add: round like the NumPy reference (float32 multiply, then add)
    return __fadd_rn(__fmul_rn(s_dmap[absmax_q[blk]], absmax_scale[blk / DQ_BLOCK_SIZE]), absmax_mean[0]);
}

// The code table and block absmax arguments of both kernels: table [16]; dq == 0: absmax [out * in/B];
// dq == 1: absmax_q [out * in/B], dmap [256], absmax_scale [ceil(out*in/B / 256)], absmax_mean [1].
#define TABLE_PARAMS                                                                                          \
    const float* __restrict__ table, const float* __restrict__ absmax,                                        \
        const unsigned char* __restrict__ absmax_q, const float* __restrict__ dmap,                           \
        const float* __restrict__ absmax_scale, const float* __restrict__ absmax_mean, int dq

// the code table and (dq) the dynamic map into shared memory, by threads tid of `threads`
__device__ __forceinline__ void load_tables(float* s_table, float* s_dmap, const float* __restrict__ table,
                                            const float* __restrict__ dmap, int dq, int tid, int threads)
{
    if (tid < 16) s_table[tid] = table[tid];
    if (dq) {
        for (int i = tid; i < 256; i += threads) s_dmap[i] = dmap[i];
    }
    __syncthreads();
}

extern "C" __global__ void lut4_matmul_fused(
    const unsigned char* __restrict__ qweight,   // [out, in/2]
    TABLE_PARAMS,
    const float* __restrict__ x,                 // [m, in], 16-byte aligned
    float* __restrict__ y,                       // [m, out]
    int n_out, int n_in, int block_size)
{
    __shared__ float s_table[16];
    __shared__ float s_dmap[256];
    // blockDim = (32, WARPS_PER_BLOCK)
    load_tables(s_table, s_dmap, table, dmap, dq, threadIdx.y * 32 + threadIdx.x, 32 * WARPS_PER_BLOCK);

    const int o = blockIdx.x * WARPS_PER_BLOCK + threadIdx.y;
    const int r = blockIdx.y;
    if (o >= n_out) return;
    const int n_words = n_in / 8;
    const int blocks_per_row = n_in / block_size;
    const unsigned int* row = reinterpret_cast<const unsigned int*>(qweight + (long long)o * (n_in / 2));
    const float4* xr = reinterpret_cast<const float4*>(x + (long long)r * n_in);

    float acc = 0.0f;
    for (int w = threadIdx.x; w < n_words; w += 32) {
        const unsigned int bits = row[w];  // byte k (little-endian) = weights 8w+2k (high), 8w+2k+1 (low)
        const float4 a = xr[2 * w];
        const float4 b = xr[2 * w + 1];
        float part = s_table[(bits >> 4) & 15] * a.x + s_table[bits & 15] * a.y;
        part += s_table[(bits >> 12) & 15] * a.z + s_table[(bits >> 8) & 15] * a.w;
        part += s_table[(bits >> 20) & 15] * b.x + s_table[(bits >> 16) & 15] * b.y;
        part += s_table[(bits >> 28) & 15] * b.z + s_table[(bits >> 24) & 15] * b.w;
        const long long blk = (long long)o * blocks_per_row + (8 * w) / block_size;
        acc += part * block_scale(blk, dq, absmax, absmax_q, s_dmap, absmax_scale, absmax_mean);
    }
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (threadIdx.x == 0) y[(long long)r * n_out + o] = acc;
}

extern "C" __global__ void lut4_dequantize(
    const unsigned char* __restrict__ qweight,   // [out * in/2]
    TABLE_PARAMS,
    float* __restrict__ w,                       // [out * in]
    long long n_bytes, int block_size)
{
    __shared__ float s_table[16];
    __shared__ float s_dmap[256];
    load_tables(s_table, s_dmap, table, dmap, dq, threadIdx.x, blockDim.x);

    float2* w2 = reinterpret_cast<float2*>(w);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n_bytes; k += stride) {
        const unsigned char c = qweight[k];
        const float s = block_scale((2 * k) / block_size, dq, absmax, absmax_q, s_dmap, absmax_scale,
                                    absmax_mean);
        w2[k] = make_float2(__fmul_rn(s_table[c >> 4], s), __fmul_rn(s_table[c & 15], s));
    }
}
