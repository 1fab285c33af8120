// CUDA kernels of the e8p format (QuIP#, Tseng et al. 2024, §4.2-4.3); layout and semantics in
// runtime/formats/e8p.py, codebooks and the 16-bit code layout in runtime/e8p.py, launchers
// in runtime/kernels/e8p_cuda.py. The Hadamard transforms around Ŵ run as CuPy array code.
//
// An E8P code c (uint16) decodes with the signed source table T [256][8] (float32; coordinate 0
// of row j carries the parity of source vector j):
//   j = c >> 8;  sign_k = bit k of c (k = 1..7);  sign_0 = parity of bits 1..7;
//   point[k] = (sign_k ? -T[j][k] : T[j][k]) + (c & 1 ? +0.25 : -0.25)
// A 1-bit E8 code (uint8) is a row of the table E [256][8].
//
// *_stage_matmul: y[r, o] (+)= scale * sum_g <point(codes[o, g]), x[r, 8g : 8g + 8]>
//   one warp per (output row o, input row r); where a row of codes is 16-byte aligned (`vector`) each
//   lane reads 16 bytes of codes at a time (8 E8P codes, 16 1-bit codes) and takes those groups, else
//   groups g = lane, lane + 32, ...; x is read as two float4 per group. The table lives in shared
//   memory with rows padded to TABLE_STRIDE floats, so that the lanes' lookups of coordinate k of
//   different rows fall in different banks (a stride of 8 put every 4th row in the same bank).
// *_stage_decode: w[o, 8g + i] (+)= scale * point(codes[o, g])[i], one thread per group; the
//   caller multiplies the decoded Ŵ with cuBLAS (prefill).
// Each pair of entry points (E8P, 1-bit E8) shares one template body (STAGE_KERNELS stamps them
// out); `stage_point` decodes.
// WARPS_PER_BLOCK, TABLE_FLOATS: -D defines from runtime/kernels/e8p_cuda.py (cuda_source.py).

constexpr int TABLE_STRIDE = 9;  // floats per row of the shared table: 8 coordinates and a pad
constexpr int TABLE_SHARED = TABLE_FLOATS / 8 * TABLE_STRIDE;

__device__ __forceinline__ void load_table(float* s_table, const float* table, int tid, int threads)
{
    for (int i = tid; i < TABLE_FLOATS; i += threads) s_table[i / 8 * TABLE_STRIDE + i % 8] = table[i];
}

// The 8 coordinates of E8P point `code` into p[0..7] (same float32 operations as the NumPy reference).
__device__ __forceinline__ void e8p_point(unsigned int code, const float* s_table, float* p)
{
    const float* row = s_table + (code >> 8) * TABLE_STRIDE;
    const float shift = (code & 1u) ? 0.25f : -0.25f;
    const unsigned int flips = __popc((code >> 1) & 0x7Fu);
    p[0] = __fadd_rn((flips & 1u) ? -row[0] : row[0], shift);
#pragma unroll
    for (int k = 1; k < 8; ++k) p[k] = __fadd_rn(((code >> k) & 1u) ? -row[k] : row[k], shift);
}

__device__ __forceinline__ float dot8(const float* p, float4 a, float4 b)
{
    return p[0] * a.x + p[1] * a.y + p[2] * a.z + p[3] * a.w + p[4] * b.x + p[5] * b.y + p[6] * b.z + p[7] * b.w;
}

__device__ __forceinline__ void finish_row(float acc, float scale, float* y, long long at, int accumulate)
{
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (threadIdx.x == 0) y[at] = accumulate ? y[at] + scale * acc : scale * acc;
}

// The 8 coordinates of stage code `code` into p[0..7]: an E8P code (uint16) decodes through the
// signed source table, a 1-bit E8 code (uint8) is a row of its table.
__device__ __forceinline__ void stage_point(unsigned short code, const float* s_table, float* p)
{
    e8p_point(code, s_table, p);
}

__device__ __forceinline__ void stage_point(unsigned char code, const float* s_table, float* p)
{
#pragma unroll
    for (int k = 0; k < 8; ++k) p[k] = s_table[code * TABLE_STRIDE + k];
}

// code i of the 16 bytes `four` (words in little-endian order)
template <typename Code>
__device__ __forceinline__ Code code_in(const uint4& four, int i)
{
    const unsigned int words[4] = {four.x, four.y, four.z, four.w};
    const int byte = i * (int)sizeof(Code);
    return (Code)(words[byte / 4] >> (8 * (byte % 4)));
}

template <typename Code>
__device__ __forceinline__ void stage_matmul(const Code* __restrict__ codes, const float* __restrict__ table,
                                             float scale, const float* __restrict__ x, float* __restrict__ y,
                                             int n_out, int n_in, int accumulate, int vector)
{
    __shared__ float s_table[TABLE_SHARED];
    load_table(s_table, table, threadIdx.y * 32 + threadIdx.x, 32 * WARPS_PER_BLOCK);
    __syncthreads();

    const int o = blockIdx.x * WARPS_PER_BLOCK + threadIdx.y;
    const int r = blockIdx.y;
    if (o >= n_out) return;
    const int n_groups = n_in / 8;
    const Code* row = codes + (long long)o * n_groups;
    const float4* xr = reinterpret_cast<const float4*>(x + (long long)r * n_in);
    float acc = 0.0f;
    float p[8];
    constexpr int PER_LOAD = 16 / sizeof(Code);  // codes in 16 bytes
    int g_rest = 0;  // the groups from here on go one per lane
    if (vector) {
        const uint4* row4 = reinterpret_cast<const uint4*>(row);
        const int n_loads = n_groups / PER_LOAD;
        for (int v = threadIdx.x; v < n_loads; v += 32) {
            const uint4 four = row4[v];
#pragma unroll
            for (int i = 0; i < PER_LOAD; ++i) {
                const int g = v * PER_LOAD + i;
                stage_point(code_in<Code>(four, i), s_table, p);
                acc += dot8(p, xr[2 * g], xr[2 * g + 1]);
            }
        }
        g_rest = n_loads * PER_LOAD;
    }
    for (int g = g_rest + threadIdx.x; g < n_groups; g += 32) {
        stage_point(row[g], s_table, p);
        acc += dot8(p, xr[2 * g], xr[2 * g + 1]);
    }
    finish_row(acc, scale, y, (long long)r * n_out + o, accumulate);
}

template <typename Code>
__device__ __forceinline__ void stage_decode(const Code* __restrict__ codes, const float* __restrict__ table,
                                             float scale, float* __restrict__ w, long long n_groups, int accumulate)
{
    __shared__ float s_table[TABLE_SHARED];
    load_table(s_table, table, threadIdx.x, blockDim.x);
    __syncthreads();

    float4* w4 = reinterpret_cast<float4*>(w);
    const long long stride = (long long)gridDim.x * blockDim.x;
    float p[8];
    for (long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x; g < n_groups; g += stride) {
        stage_point(codes[g], s_table, p);
        float4 a = make_float4(__fmul_rn(scale, p[0]), __fmul_rn(scale, p[1]), __fmul_rn(scale, p[2]),
                               __fmul_rn(scale, p[3]));
        float4 b = make_float4(__fmul_rn(scale, p[4]), __fmul_rn(scale, p[5]), __fmul_rn(scale, p[6]),
                               __fmul_rn(scale, p[7]));
        if (accumulate) {
            const float4 a0 = w4[2 * g], b0 = w4[2 * g + 1];
            a = make_float4(a0.x + a.x, a0.y + a.y, a0.z + a.z, a0.w + a.w);
            b = make_float4(b0.x + b.x, b0.y + b.y, b0.z + b.z, b0.w + b.w);
        }
        w4[2 * g] = a;
        w4[2 * g + 1] = b;
    }
}

// PREFIX_stage_matmul and PREFIX_stage_decode of CODE codes ([out, in/8]) with their [256, 8] table;
// x [m, in] and w [out * in] 16-byte aligned, y [m, out]; `vector`: the rows of codes are 16-byte aligned.
#define STAGE_KERNELS(PREFIX, CODE)                                                                           \
    extern "C" __global__ void PREFIX##_stage_matmul(                                                         \
        const CODE* __restrict__ codes, const float* __restrict__ table, float scale,                         \
        const float* __restrict__ x, float* __restrict__ y, int n_out, int n_in, int accumulate, int vector)  \
    {                                                                                                         \
        stage_matmul(codes, table, scale, x, y, n_out, n_in, accumulate, vector);                             \
    }                                                                                                         \
    extern "C" __global__ void PREFIX##_stage_decode(                                                         \
        const CODE* __restrict__ codes, const float* __restrict__ table, float scale,                         \
        float* __restrict__ w, long long n_groups, int accumulate)                                            \
    {                                                                                                         \
        stage_decode(codes, table, scale, w, n_groups, accumulate);                                           \
    }

STAGE_KERNELS(e8p, unsigned short)   // E8P codes, the signed source table
STAGE_KERNELS(table, unsigned char)  // 1-bit E8 codes, the table of E8 points
