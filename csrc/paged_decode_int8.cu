// The decode kernels over int8 pages: every q dtype x supported head dim x group tile.
#include "paged_decode.cuh"

namespace kvkernels {

bool launch_paged_decode_int8(const PagedDecodeParams& params, ScalarType q_type, cudaStream_t stream) {
  return launch_paged_decode_quantized<int8_t>(params, q_type, stream);
}

}  // namespace kvkernels
