// kernels/cuda_ops.h without a CUDA build: no devices, every launch UNAVAILABLE.
#include "kernels/cuda_ops.h"

namespace kvmem::kernels::cuda {
namespace {
Status NoCuda() { return Unavailable("kvmem was built without CUDA"); }
}  // namespace

int DeviceCount() { return 0; }
int MultiprocessorCount() { return 0; }
uint32_t AttendResidentBlocks(uint32_t, uint32_t, DType) { return 0; }
uint32_t AttendActiveClusters(uint32_t, uint32_t, DType, uint32_t) { return 0; }
Status UploadAttendPlan(const AttendPlan&, void*, void*) { return NoCuda(); }
Status LaunchAttend(const AttendPlan&, void*, void*) { return NoCuda(); }
Status LaunchAttendTraced(const AttendPlan&, void*, void*, uint64_t*) { return NoCuda(); }
size_t DenseAttendWorkspaceBytes(const DenseAttendView&, const DenseAttendOptions&) { return 0; }
Status DenseAttend(const DenseAttendView&, const DenseAttendOptions&, void*, size_t, void*) {
  return NoCuda();
}
Status ChunkSummary(const ChunkSummaryView&, void*) { return NoCuda(); }
Status NodeBounds(const NodeBoundsView&, void*) { return NoCuda(); }
Status ChunkMaxScores(const ChunkMaxScoresView&, void*) { return NoCuda(); }
Status TokenLogits(const TokenLogitsView&, void*) { return NoCuda(); }
Status TopK(const TopKView&, void*) { return NoCuda(); }
Status PooledBlockScores(const PooledBlockScoresView&, void*) { return NoCuda(); }
Status CopySegments(const CopySegment*, uint32_t, void*) { return NoCuda(); }
Status LaunchTrap(void*) { return NoCuda(); }
CopyStager::~CopyStager() = default;
Status CopyStager::Add(void*, const void*, size_t) { return NoCuda(); }
void CopyStager::AddDevice(void*, const void*, size_t, bool) {}
Status CopyStager::Flush(void*) { return NoCuda(); }
Status CopyStager::Wait() { return NoCuda(); }
Status CopyStager::ReservePinned(size_t) { return NoCuda(); }
DeviceTree::~DeviceTree() = default;
Status DeviceTree::Sync(const FlatTree&, void*, CopyStager*) { return NoCuda(); }
uint64_t DeviceTree::device_bytes() const { return 0; }
Status DeviceTree::Reserve(Buffer*, size_t, size_t, void*) { return NoCuda(); }
Status UploadSearchAttendPlan(const SearchAttendPlan&, void*, void*) { return NoCuda(); }
Status LaunchTreeSearch(const SearchAttendPlan&, void*, void*) { return NoCuda(); }
Status LaunchSearchAttend(const SearchAttendPlan&, void*, void*) { return NoCuda(); }
uint32_t TreeSearchClusterSize(const SearchAttendPlan&) { return 0; }
bool TreeSearchUsesFlat(const SearchAttendPlan&) { return false; }

}  // namespace kvmem::kernels::cuda
