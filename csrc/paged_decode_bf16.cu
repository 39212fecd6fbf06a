// The bf16 decode kernels: every supported head dim x group tile (one file per dtype so they build in parallel).
#include "paged_decode.cuh"

namespace kvkernels {

bool launch_paged_decode_bf16(const PagedDecodeParams& params, cudaStream_t stream) {
  return launch_paged_decode_typed<__nv_bfloat16>(params, stream);
}

}  // namespace kvkernels
