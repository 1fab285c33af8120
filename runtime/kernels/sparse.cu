// CUDA kernel of the sparse (CSR) format (layout and NumPy reference: runtime/formats/sparse.py; launcher:
// runtime/kernels/sparse_cuda.py), SpQR's outliers (Dettmers et al. 2023, §3.2).
//
// sparse_add: y[r, o] += sum_k values[k] * x[r, col_idx[k]] over the CSR entries k of row o; one thread per
//   (o, r). SpQR passes the corrections (outlier value - dense value) as values, so outliers replace dense
//   weights.

extern "C" __global__ void sparse_add(const int* __restrict__ row_ptr, const unsigned short* __restrict__ col_idx,
                                      const float* __restrict__ values, const float* __restrict__ x,
                                      float* __restrict__ y, int n_in, int n_out, int m)
{
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    const int r = blockIdx.y;
    if (o >= n_out || r >= m) return;
    const float* xr = x + (long long)r * n_in;
    float acc = 0.0f;
    for (int k = row_ptr[o]; k < row_ptr[o + 1]; ++k) acc = fmaf(values[k], xr[col_idx[k]], acc);
    y[(long long)r * n_out + o] += acc;
}
