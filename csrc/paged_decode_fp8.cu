// The decode kernels over fp8 (e4m3) pages: every q dtype x supported head dim x group tile.
#include "paged_decode.cuh"

namespace kvkernels {

bool launch_paged_decode_fp8(const PagedDecodeParams& params, ScalarType q_type, cudaStream_t stream) {
  return launch_paged_decode_quantized<__nv_fp8_e4m3>(params, q_type, stream);
}

}  // namespace kvkernels
