#include "index/detail/kmeans.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "index/detail/vec_math.h"

namespace kvmem::index::detail {

namespace {

uint32_t Nearest(const float* x, const std::vector<float>& centers, uint32_t k, uint32_t dim) {
  uint32_t best = 0;
  float best_dot = -INFINITY;
  for (uint32_t j = 0; j < k; ++j) {
    const float d = Dot(x, &centers[size_t{j} * dim], dim);
    if (d > best_dot) {
      best_dot = d;
      best = j;
    }
  }
  return best;
}

// Nearest center of four points at once: each center row is loaded once for four dot products
// (the assignment pass dominates k-means time at large k).
void Nearest4(const float* const x[4], const std::vector<float>& centers, uint32_t k,
              uint32_t dim, uint32_t out[4]) {
  float best[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
  for (int p = 0; p < 4; ++p) out[p] = 0;
  for (uint32_t j = 0; j < k; ++j) {
    const float* c = &centers[size_t{j} * dim];
    float d[4];
    Dot4(x, c, dim, d);
    for (int p = 0; p < 4; ++p) {
      if (d[p] > best[p]) {
        best[p] = d[p];
        out[p] = j;
      }
    }
  }
}

// Labels of points idx[0..n) (rows of x).
void Assign(const std::vector<float>& x, const uint32_t* idx, uint32_t n,
            const std::vector<float>& centers, uint32_t k, uint32_t dim, uint32_t* labels) {
  uint32_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float* rows[4] = {&x[size_t{idx[i]} * dim], &x[size_t{idx[i + 1]} * dim],
                            &x[size_t{idx[i + 2]} * dim], &x[size_t{idx[i + 3]} * dim]};
    Nearest4(rows, centers, k, dim, labels + i);
  }
  for (; i < n; ++i) labels[i] = Nearest(&x[size_t{idx[i]} * dim], centers, k, dim);
}

}  // namespace

std::vector<uint32_t> SphericalKMeans(const float* points, uint32_t m, uint32_t dim,
                                      const KMeansParams& params, uint32_t* clusters) {
  std::vector<uint32_t> labels(m, 0);
  *clusters = m == 0 ? 0 : 1;
  if (m <= 1 || params.k <= 1) return labels;

  std::vector<float> x(size_t{m} * dim);
  for (uint32_t i = 0; i < m; ++i) {
    const float* p = points + size_t{i} * dim;
    const float n = Norm(p, dim);
    const float inv = n > 0.f ? 1.f / n : 0.f;
    for (uint32_t d = 0; d < dim; ++d) x[size_t{i} * dim + d] = p[d] * inv;
  }

  std::mt19937_64 rng(params.seed);
  std::vector<uint32_t> sample(m);
  std::iota(sample.begin(), sample.end(), 0u);
  if (m > params.sample && params.sample > 0) {
    for (uint32_t i = 0; i < params.sample; ++i) {
      std::uniform_int_distribution<uint32_t> pick(i, m - 1);
      std::swap(sample[i], sample[pick(rng)]);
    }
    sample.resize(params.sample);
  }
  const uint32_t s = static_cast<uint32_t>(sample.size());
  const uint32_t k_max = std::min(params.k, s);

  // k-means++ on cosine distance 1 - cos.
  std::vector<float> centers;
  centers.reserve(size_t{k_max} * dim);
  std::vector<float> dist(s, INFINITY);
  uint32_t first = std::uniform_int_distribution<uint32_t>(0, s - 1)(rng);
  centers.insert(centers.end(), &x[size_t{sample[first]} * dim],
                 &x[size_t{sample[first]} * dim] + dim);
  uint32_t k = 1;
  while (k < k_max) {
    const float* c = &centers[size_t{k - 1} * dim];
    double total = 0.0;
    for (uint32_t i = 0; i < s; ++i) {
      const float d = std::max(0.f, 1.f - Dot(&x[size_t{sample[i]} * dim], c, dim));
      dist[i] = std::min(dist[i], d);
      total += double{dist[i]} * dist[i];
    }
    if (total <= 1e-12) break;  // every point already sits on a center
    double r = std::uniform_real_distribution<double>(0.0, total)(rng);
    uint32_t next = s - 1;
    for (uint32_t i = 0; i < s; ++i) {
      r -= double{dist[i]} * dist[i];
      if (r <= 0.0) {
        next = i;
        break;
      }
    }
    centers.insert(centers.end(), &x[size_t{sample[next]} * dim],
                   &x[size_t{sample[next]} * dim] + dim);
    ++k;
  }

  std::vector<uint32_t> sample_label(s, 0), next_label(s, 0);
  std::vector<double> sum(size_t{k} * dim);
  std::vector<uint32_t> count(k);
  for (uint32_t it = 0; it < params.iterations; ++it) {
    Assign(x, sample.data(), s, centers, k, dim, next_label.data());
    const bool changed = it == 0 || next_label != sample_label;
    sample_label.swap(next_label);
    if (!changed) break;
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(count.begin(), count.end(), 0u);
    for (uint32_t i = 0; i < s; ++i) {
      const float* p = &x[size_t{sample[i]} * dim];
      double* acc = &sum[size_t{sample_label[i]} * dim];
      for (uint32_t d = 0; d < dim; ++d) acc[d] += p[d];
      ++count[sample_label[i]];
    }
    for (uint32_t j = 0; j < k; ++j) {
      if (count[j] == 0) continue;  // keep the old center
      double n2 = 0.0;
      for (uint32_t d = 0; d < dim; ++d) n2 += sum[size_t{j} * dim + d] * sum[size_t{j} * dim + d];
      if (n2 <= 0.0) continue;
      const double inv = 1.0 / std::sqrt(n2);
      for (uint32_t d = 0; d < dim; ++d) {
        centers[size_t{j} * dim + d] = static_cast<float>(sum[size_t{j} * dim + d] * inv);
      }
    }
  }

  // Final assignment of every point, then dense relabelling.
  std::vector<uint32_t> all(m);
  std::iota(all.begin(), all.end(), 0u);
  Assign(x, all.data(), m, centers, k, dim, labels.data());
  std::vector<uint32_t> remap(k, UINT32_MAX);
  uint32_t used = 0;
  for (uint32_t i = 0; i < m; ++i) {
    if (remap[labels[i]] == UINT32_MAX) remap[labels[i]] = used++;
    labels[i] = remap[labels[i]];
  }
  *clusters = used;
  return labels;
}

std::vector<uint32_t> CentredSphericalKMeans(float* points, uint32_t m, uint32_t dim,
                                             const KMeansParams& params, uint32_t* clusters) {
  std::vector<double> mean(dim, 0.0);
  for (uint32_t i = 0; i < m; ++i) {
    const float* x = points + size_t{i} * dim;
    for (uint32_t d = 0; d < dim; ++d) mean[d] += x[d];
  }
  for (auto& v : mean) v /= m == 0 ? 1 : m;
  for (uint32_t i = 0; i < m; ++i) {
    float* x = points + size_t{i} * dim;
    for (uint32_t d = 0; d < dim; ++d) x[d] = static_cast<float>(x[d] - mean[d]);
  }
  return SphericalKMeans(points, m, dim, params, clusters);
}

}  // namespace kvmem::index::detail
