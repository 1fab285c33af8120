// The randomized Hadamard transform of rows on the GPU (QuIP#, Tseng et al. 2024, §3): the CUDA
// counterpart of runtime.hadamard.fast_hadamard, with the random signs fused in. Launcher:
// runtime/kernels/hadamard_cuda.py.
//
// n = K * 2**p; index i of a row = a * 2**p + b (a < K, b < 2**p). One block per row:
//   1. s[i] = x[i] * pre[i]                                   (pre: signs, when use_pre)
//   2. Walsh–Hadamard butterfly on the 2**p axis of each of the K segments, in shared memory:
//      for half = 1, 2, ..., 2**(p-1): (u, v) at b0 = block * 2 half + j, b0 + half -> (u + v, u - v)
//   3. y[i] = scale * post[i] * sum_c H[a, c] s[c, b]         (post when use_post; H^T when transpose;
//                                                             K = 1: H = [1])
// Same operations as the NumPy reference, so results agree to float32 rounding of the sums.

extern "C" __global__ void hadamard_rows(
    const float* __restrict__ x,        // [m, n]
    float* __restrict__ y,              // [m, n]
    const float* __restrict__ h_k,      // [K, K] dense factor (unused when K == 1)
    const float* __restrict__ pre,      // [n] signs applied before (read when use_pre)
    const float* __restrict__ post,     // [n] signs applied after (read when use_post)
    int use_pre, int use_post, int k, int size, float scale, int transpose)
{
    extern __shared__ float s[];         // [n]
    const int n = k * size;
    const long long row = (long long)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = use_pre ? x[row + i] * pre[i] : x[row + i];
    __syncthreads();
    const int pairs = n / 2;
    for (int half = 1; half < size; half <<= 1) {
        for (int idx = threadIdx.x; idx < pairs; idx += blockDim.x) {
            const int a = idx / (size / 2), j = idx % (size / 2);
            const int i0 = a * size + (j / half) * 2 * half + j % half;
            const float u = s[i0], v = s[i0 + half];
            s[i0] = u + v;
            s[i0 + half] = u - v;
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float value = s[i];
        if (k > 1) {
            const int a = i / size, b = i % size;
            value = 0.0f;
            for (int c = 0; c < k; ++c) value += (transpose ? h_k[c * k + a] : h_k[a * k + c]) * s[c * size + b];
        }
        value *= scale;
        y[row + i] = use_post ? value * post[i] : value;
    }
}
