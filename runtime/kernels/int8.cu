// CUDA kernels of the int8 format (LLM.int8 / SmoothQuant W8A8); layout and
// definition in runtime/formats/int8.py, launchers in runtime/kernels/int8_cuda.py.
//
// int8_outlier_columns: mask[i] = 1 where |x[r, i]| >= threshold in some row r of x [m, in] (LLM.int8's
//   outlier columns), one thread per column.
// int8_quantize_tokens: one thread block per row r of x [m, in]:
//   absmax over the columns that are not outliers (block reduction), or the
//   given per-tensor absmax; sx[r] = absmax / 127 (1 when absmax is 0);
//   xq[r, i] = rint(x[r, i] / sx[r]) (ties to even), 0 in outlier columns.
// int8_matmul_dp4a: y[r, o] = float(sum_i xq[r, i] * qweight[o, i]) * sx[r] * sw[o * sw_stride]
//   one warp per (output row o, input row r); each lane reads 16 bytes of the
//   row at a time (rows whose length is a multiple of 16; 4 bytes where it is
//   a multiple of 4) and multiplies 4 int8 pairs per __dp4a into an int32
//   accumulator, the warp sums its lanes with shuffles (integer, exact). Rows
//   whose byte length is not a multiple of 4 are not 32-bit aligned: those
//   take a byte-wise loop. sw_stride 0: one scale for the whole weight.
//   LLM.int8's outlier columns (has_outliers) are fused in: their xq is 0, and
//   the same pass adds sw[o] * sum over them of x[r, i] * qweight[o, i] in
//   float, so no host round trip decides which columns they are.
//
// Rounding matches the NumPy reference exactly: IEEE division (__fdiv_rn),
// round-to-nearest-even conversions, and two float32 products in the
// reference's order (__fmul_rn, no fused multiply-add).
// THREADS, WARPS_PER_BLOCK: -D defines from runtime/kernels/int8_cuda.py (cuda_source.py).

extern "C" __global__ void int8_outlier_columns(const float* __restrict__ x, int m, int n_in, float threshold,
                                                unsigned char* __restrict__ mask)
{
    const int i = blockIdx.x * THREADS + threadIdx.x;
    if (i >= n_in) return;
    unsigned char any = 0;
    for (int r = 0; r < m; ++r) any |= fabsf(x[(long long)r * n_in + i]) >= threshold;
    mask[i] = any;
}

// the outlier columns among the 4 at 4 k: sum of x * w in float (their xq is 0)
__device__ __forceinline__ float outlier_terms(const unsigned char* outliers, const float* xf_row,
                                               const signed char* w_row, int k)
{
    float sum = 0.0f;
    for (int j = 0; j < 4; ++j) {
        if (outliers[4 * k + j]) sum += xf_row[4 * k + j] * (float)w_row[4 * k + j];
    }
    return sum;
}

extern "C" __global__ void int8_quantize_tokens(
    const float* __restrict__ x,                // [m, in]
    const unsigned char* __restrict__ outliers, // [in], 1 = outlier column
    const float* __restrict__ tensor_absmax,    // [1]             (per_tensor == 1)
    int per_tensor,
    signed char* __restrict__ xq,               // [m, in]
    float* __restrict__ sx,                     // [m]
    int n_in)
{
    __shared__ float s_max[THREADS];
    __shared__ float s_scale;
    const long long base = (long long)blockIdx.x * n_in;
    float local = 0.0f;
    if (!per_tensor) {
        for (int i = threadIdx.x; i < n_in; i += THREADS) {
            if (!outliers[i]) local = fmaxf(local, fabsf(x[base + i]));
        }
    }
    s_max[threadIdx.x] = local;
    __syncthreads();
    for (int half = THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) s_max[threadIdx.x] = fmaxf(s_max[threadIdx.x], s_max[threadIdx.x + half]);
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const float absmax = per_tensor ? tensor_absmax[0] : s_max[0];
        s_scale = absmax > 0.0f ? __fdiv_rn(absmax, 127.0f) : 1.0f;
        sx[blockIdx.x] = s_scale;
    }
    __syncthreads();
    const float s = s_scale;
    for (int i = threadIdx.x; i < n_in; i += THREADS) {
        xq[base + i] = outliers[i] ? 0 : (signed char)__float2int_rn(__fdiv_rn(x[base + i], s));
    }
}

extern "C" __global__ void int8_matmul_dp4a(
    const signed char* __restrict__ qweight,    // [out, in]
    const float* __restrict__ sw,               // [out] (the one scale repeated for "tensor")
    const signed char* __restrict__ xq,         // [m, in]
    const float* __restrict__ sx,               // [m]
    const unsigned char* __restrict__ outliers, // [in], 1 = outlier column (read when has_outliers)
    const float* __restrict__ x,                // [m, in] float input (read when has_outliers)
    float* __restrict__ y,                      // [m, out]
    int n_out, int n_in, int has_outliers, int sw_stride)
{
    const int o = blockIdx.x * WARPS_PER_BLOCK + threadIdx.y;  // blockDim = (32, WARPS_PER_BLOCK)
    const int r = blockIdx.y;
    if (o >= n_out) return;
    const signed char* w_row = qweight + (long long)o * n_in;
    const signed char* x_row = xq + (long long)r * n_in;
    const float* xf_row = x + (long long)r * n_in;
    int acc = 0;
    float outlier_acc = 0.0f;  // sum over outlier columns of x * qweight (their xq is 0)
    if (n_in % 16 == 0) {
        const int4* w16 = reinterpret_cast<const int4*>(w_row);
        const int4* x16 = reinterpret_cast<const int4*>(x_row);
        const int4* mask16 = reinterpret_cast<const int4*>(outliers);
        for (int k = threadIdx.x; k < n_in / 16; k += 32) {
            const int4 w = w16[k], xv = x16[k];
            acc = __dp4a(w.x, xv.x, acc);
            acc = __dp4a(w.y, xv.y, acc);
            acc = __dp4a(w.z, xv.z, acc);
            acc = __dp4a(w.w, xv.w, acc);
            if (has_outliers) {
                const int4 mask = mask16[k];
                if (mask.x) outlier_acc += outlier_terms(outliers, xf_row, w_row, 4 * k);
                if (mask.y) outlier_acc += outlier_terms(outliers, xf_row, w_row, 4 * k + 1);
                if (mask.z) outlier_acc += outlier_terms(outliers, xf_row, w_row, 4 * k + 2);
                if (mask.w) outlier_acc += outlier_terms(outliers, xf_row, w_row, 4 * k + 3);
            }
        }
    } else if (n_in % 4 == 0) {
        const int* w4 = reinterpret_cast<const int*>(w_row);
        const int* x4 = reinterpret_cast<const int*>(x_row);
        const int* mask4 = reinterpret_cast<const int*>(outliers);
        for (int k = threadIdx.x; k < n_in / 4; k += 32) {
            acc = __dp4a(w4[k], x4[k], acc);
            if (has_outliers && mask4[k]) outlier_acc += outlier_terms(outliers, xf_row, w_row, k);
        }
    } else {
        for (int i = threadIdx.x; i < n_in; i += 32) {
            acc += (int)w_row[i] * (int)x_row[i];
            if (has_outliers && outliers[i]) outlier_acc += xf_row[i] * (float)w_row[i];
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        acc += __shfl_down_sync(0xffffffffu, acc, offset);
        outlier_acc += __shfl_down_sync(0xffffffffu, outlier_acc, offset);
    }
    if (threadIdx.x == 0) {
        const float scale = sw[o * sw_stride];
        float value = __fmul_rn(__fmul_rn(__int2float_rn(acc), sx[r]), scale);
        if (has_outliers) value += outlier_acc * scale;
        y[(long long)r * n_out + o] = value;
    }
}
