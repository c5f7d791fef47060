// Spherical k-means used by the cluster tree's bulk build. Internal.
#pragma once

#include <cstdint>
#include <vector>

namespace kvmem::index::detail {

struct KMeansParams {
  uint32_t k = 2;
  uint32_t iterations = 8;
  uint32_t sample = 8192;  // iterate on at most this many points, then assign all once
  uint64_t seed = 1;
};

// Clusters the m points [m][dim] by cosine similarity (points are normalised internally; a zero
// point joins cluster 0). Returns a label per point in [0, k'), k' <= k, labels dense (no empty
// cluster). Deterministic for a given seed. k' == 1 when the points cannot be told apart.
std::vector<uint32_t> SphericalKMeans(const float* points, uint32_t m, uint32_t dim,
                                      const KMeansParams& params, uint32_t* clusters);

// SphericalKMeans of the points after subtracting their mean, in place (`points` is modified).
// Keys share a large common component (outlier channels, a bias); raw cosine similarity would
// group them by it instead of by content. Used by the cluster tree and the memory gate tree.
std::vector<uint32_t> CentredSphericalKMeans(float* points, uint32_t m, uint32_t dim,
                                             const KMeansParams& params, uint32_t* clusters);

}  // namespace kvmem::index::detail
