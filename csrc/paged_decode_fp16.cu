// The fp16 decode kernels: every supported head dim x group tile (one file per dtype so they build in parallel).
#include "paged_decode.cuh"

namespace kvkernels {

bool launch_paged_decode_fp16(const PagedDecodeParams& params, cudaStream_t stream) {
  return launch_paged_decode_typed<__half>(params, stream);
}

}  // namespace kvkernels
