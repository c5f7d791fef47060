// Builds without CUDA: no device pool.
#include "daemon/kv_pool.h"

namespace kvmem {

Result<std::unique_ptr<KVPool>> CreateDevicePool(const SlabAllocator::Options&, int, std::string) {
  return Unavailable("this kvmemd was built without CUDA (KVMEM_WITH_CUDA=OFF or no nvcc)");
}

int CudaDeviceCount() { return 0; }

bool DeviceGraphSubmit() { return false; }

}  // namespace kvmem
