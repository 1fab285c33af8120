// The elementwise work of a Llama decode step on the GPU, one kernel per piece, each reading the token's
// position from device memory (pos[0]) so that a step captured as a CUDA graph replays at every position
// (runtime/cuda_graph_step.py). Launchers: runtime/kernels/llama_step_cuda.py, which passes THREADS (the
// block size of every kernel here, a multiple of 32, at most 1024) as a -D define. The math is the CPU
// forward pass's (model.py: rms_norm, rope, attend_decode, swiglu), to float32 rounding.
//
// residual_rms_norm: x += y (when add), then out = x / sqrt(mean(x^2) + eps) * w; one block, one row [d].
// rope_store: q (in place) and k rotated at position p (HF half-split layout: (a, b) at j, j + hd/2 ->
//   (a cos - b sin, b cos + a sin)), k and v written into the layer's cache [n_kv, max_len, hd] at p.
// attend: one block per query head h (kv head h / group): scores[h, t] = q_h . K[t] * scale for t <= p
//   (a warp per key), softmax over them, out[h] = sum_t p_t V[t] (threads over (t mod G, d) where
//   G = THREADS / hd, the G partial sums added in shared memory). scores: a [n_heads, max_len] scratch.
// silu_mul: out = g (0.5 + 0.5 tanh(g / 2)) u (= silu(g) u, as model.swiglu writes it).

#include "common.cuh"

__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000u); }

// the sum (or max) of v over the block; every thread gets it (red: 32 floats of shared memory)
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* red)
{
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, v, offset);
        v = MAX ? fmaxf(v, other) : v + other;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // red may still be read by a previous reduction
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < THREADS / 32 ? red[lane] : (MAX ? negative_infinity() : 0.0f);
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, v, offset);
        v = MAX ? fmaxf(v, other) : v + other;
    }
    return v;
}

extern "C" __global__ void residual_rms_norm(float* __restrict__ x, const float* __restrict__ y,
                                             const float* __restrict__ w, float* __restrict__ out, int d,
                                             float eps, int add)
{
    __shared__ float red[32];
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += THREADS) {
        float v = x[i];
        if (add) {
            v += y[i];
            x[i] = v;
        }
        ss = fmaf(v, v, ss);
    }
    const float root = sqrtf(block_reduce<false>(ss, red) / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += THREADS) out[i] = x[i] / root * w[i];
}

extern "C" __global__ void rope_store(float* __restrict__ q, const float* __restrict__ k,
                                      const float* __restrict__ v, const float* __restrict__ cos_table,
                                      const float* __restrict__ sin_table, const int* __restrict__ pos,
                                      float* __restrict__ k_cache, float* __restrict__ v_cache, int n_heads,
                                      int n_kv, int hd, int max_len)
{
    const int half = hd / 2, p = pos[0];
    const int i = blockIdx.x * THREADS + threadIdx.x;
    const int n_q = n_heads * half, n_k = n_kv * half;
    if (i < n_q + n_k) {
        const bool is_q = i < n_q;
        const int r = is_q ? i : i - n_q;
        const int h = r / half, j = r % half;
        const float c = cos_table[(long long)p * half + j], s = sin_table[(long long)p * half + j];
        const float* src = is_q ? q : k;
        const float a = src[h * hd + j], b = src[h * hd + j + half];
        float* dst = is_q ? q + h * hd : k_cache + ((long long)h * max_len + p) * hd;
        dst[j] = a * c - b * s;
        dst[j + half] = b * c + a * s;
    } else if (i < n_q + n_k + n_kv * hd) {
        const int r = i - n_q - n_k;
        v_cache[((long long)(r / hd) * max_len + p) * hd + r % hd] = v[r];
    }
}

extern "C" __global__ void attend(const float* __restrict__ q, const float* __restrict__ k_cache,
                                  const float* __restrict__ v_cache, const int* __restrict__ pos,
                                  float* __restrict__ scores, float* __restrict__ out, int group, int hd,
                                  int max_len, float scale)
{
    __shared__ float red[32];
    __shared__ float partial[THREADS];
    const int h = blockIdx.x, seen = pos[0] + 1;
    const float* qh = q + h * hd;
    const float* keys = k_cache + (long long)(h / group) * max_len * hd;    // [max_len, hd]
    const float* values = v_cache + (long long)(h / group) * max_len * hd;  // [max_len, hd]
    float* sc = scores + (long long)h * max_len;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int t = warp; t < seen; t += THREADS / 32) {
        float dot = 0.0f;
        for (int d = lane; d < hd; d += 32) dot = fmaf(qh[d], keys[(long long)t * hd + d], dot);
        for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        if (lane == 0) sc[t] = dot * scale;
    }
    __syncthreads();
    float top = negative_infinity();
    for (int t = threadIdx.x; t < seen; t += THREADS) top = fmaxf(top, sc[t]);
    top = block_reduce<true>(top, red);
    float total = 0.0f;
    for (int t = threadIdx.x; t < seen; t += THREADS) {
        const float e = expf(sc[t] - top);
        sc[t] = e;
        total += e;
    }
    total = block_reduce<false>(total, red);  // its __syncthreads also orders the writes of sc above
    const int groups = THREADS / hd, g = threadIdx.x / hd, d = threadIdx.x % hd;
    float acc = 0.0f;
    if (g < groups)
        for (int t = g; t < seen; t += groups) acc = fmaf(sc[t], values[(long long)t * hd + d], acc);
    partial[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x < hd) {
        float o = 0.0f;
        for (int j = 0; j < groups; ++j) o += partial[j * hd + threadIdx.x];
        out[h * hd + threadIdx.x] = o / total;
    }
}

extern "C" __global__ void silu_mul(const float* __restrict__ gate, const float* __restrict__ up,
                                    float* __restrict__ out, int n)
{
    const int i = blockIdx.x * THREADS + threadIdx.x;
    if (i < n) {
        const float g = gate[i];
        out[i] = g * (0.5f + 0.5f * tanhf(0.5f * g)) * up[i];
    }
}
