// kvmem-bench-memory: SelectMemory's inner-product gate (index/gate_tree.h) against a linear
// scan of the same gate keys, in the same run (issue 5).
//
//   build/bin/kvmem-bench-memory [--quick] [--dim D] [--k K] [--queries N] [--budget-leaves L]
//                                [--data clustered|iid|both] [--blocks N,N,...]
//                                [--radius-weight W] [--sweep-budget] [--e2e] --json FILE
//
// Methods per block count: `linear` (GateTree::Scan: every key scored, the reference),
// `tree_exact` (GateTree::SearchExact), `tree_budget` (GateTree::SearchBudget with at most L
// leaves). With --e2e, the same three gates also through a real kvmemd (SelectMemory round
// trips with payloads, rows with "path": "kvmemd", 10K and 100K blocks). exact_agreement =
// fraction of queries whose id list AND scores equal linear's exactly (ties broken by id). recall = |ids ∩ linear ids| / k averaged.
//
// Data (bench/README.md, "kvmem-bench-memory"): `clustered` gate keys like real memory keys:
// a shared offset (keys share a common component), 1024 topics, 16 subtopics per topic, keys
// around their subtopic, a few high-variance channels; queries come from a random subtopic plus
// noise (a working memory that relates to some stored block). `iid`: iid N(0, 1) keys and
// queries, the worst case for any ball tree (reported, not a target).
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "bench/data/git_commit.h"
#include "client/client.h"
#include "index/gate_tree.h"
#include "testing/daemon_process.h"

namespace {

using json = nlohmann::json;
using kvmem::index::GateResult;
using kvmem::index::GateTree;

struct Args {
  bool quick = false;
  uint32_t dim = 128;
  uint32_t k = 16;
  uint32_t queries = 0;  // 0: 200 (100 with --quick)
  uint32_t budget_leaves = 32;
  float radius_weight = kvmem::index::kDefaultRadiusWeight;
  bool sweep = false;
  std::vector<uint32_t> blocks;  // --blocks N,N,...: overrides the sizes
  bool e2e = false;              // --e2e: also SelectMemory through a real kvmemd
  std::string data = "both";
  std::string json_path;
};

struct Data {
  std::vector<float> keys;     // [n][dim]
  std::vector<float> queries;  // [q][dim]
};

// See the file comment. Deterministic for a seed.
Data Clustered(uint32_t n, uint32_t queries, uint32_t dim, uint64_t seed) {
  constexpr uint32_t kTopics = 1024, kSub = 16;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> scale(dim, 1.f);
  for (uint32_t d = 0; d < dim; d += 16) scale[d] = 3.f;  // outlier channels
  std::vector<float> offset(dim);
  for (auto& v : offset) v = 0.5f * g(rng);
  std::vector<float> topic(size_t{kTopics} * dim), sub(size_t{kTopics} * kSub * dim);
  for (size_t i = 0; i < topic.size(); ++i) topic[i] = scale[i % dim] * g(rng);
  for (size_t i = 0; i < sub.size(); ++i) {
    const size_t t = i / (size_t{kSub} * dim), d = i % dim;
    sub[i] = topic[t * dim + d] + 0.35f * scale[d] * g(rng);
  }
  Data out;
  out.keys.resize(size_t{n} * dim);
  for (uint32_t i = 0; i < n; ++i) {
    const float* s = &sub[(rng() % (size_t{kTopics} * kSub)) * dim];
    for (uint32_t d = 0; d < dim; ++d) {
      out.keys[size_t{i} * dim + d] = offset[d] + s[d] + 0.25f * scale[d] * g(rng);
    }
  }
  out.queries.resize(size_t{queries} * dim);
  for (uint32_t i = 0; i < queries; ++i) {
    const float* s = &sub[(rng() % (size_t{kTopics} * kSub)) * dim];
    for (uint32_t d = 0; d < dim; ++d) out.queries[size_t{i} * dim + d] = s[d] + 0.5f * g(rng);
  }
  return out;
}

Data Iid(uint32_t n, uint32_t queries, uint32_t dim, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.f, 1.f);
  Data out;
  out.keys.resize(size_t{n} * dim);
  for (auto& v : out.keys) v = g(rng);
  out.queries.resize(size_t{queries} * dim);
  for (auto& v : out.queries) v = g(rng);
  return out;
}


double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Runs one method over every query (twice; the second, warm pass is timed).
template <typename Fn>
std::vector<GateResult> RunMethod(const Data& d, uint32_t dim, uint32_t nq, Fn fn, double* us) {
  std::vector<GateResult> out(nq);
  for (int pass = 0; pass < 2; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    for (uint32_t i = 0; i < nq; ++i) {
      auto r = fn(std::span<const float>(&d.queries[size_t{i} * dim], dim));
      if (!r.ok()) {
        std::fprintf(stderr, "search failed: %s\n", r.status().ToString().c_str());
        std::exit(1);
      }
      out[i] = std::move(*r);
    }
    *us = Seconds(t0) * 1e6 / nq;
  }
  return out;
}

// SelectMemory round trips through a real kvmemd (same data, same k): the op as a client sees
// it, payloads included ([1, 64] bf16 per block). Rows carry "path": "kvmemd".
int RunE2E(const Args& a, const std::vector<uint32_t>& sizes, uint32_t nq, json* results) {
  namespace kc = kvmem::client;
  kvmem::testing::DaemonProcess d({"--progress", "poll", "--executors", "0", "--device-memory",
                                   std::to_string(2ull << 30)});
  if (!d.ready()) {
    std::fprintf(stderr, "kvmemd did not start\n");
    return 1;
  }
  kc::ClientOptions o;
  o.transport = "shm";
  o.request_timeout_ms = 600000;
  o.spin_us = 1000000;  // wait by spinning, as kvmem-bench-e2e does (no event-fd wake-up in the timing)
  auto c = kc::Client::Connect(d.address(), o);
  if (!c.ok()) {
    std::fprintf(stderr, "%s\n", c.status().ToString().c_str());
    return 1;
  }
  kc::Client& cl = **c;
  constexpr uint32_t kRows = 1, kDm = 64, kBatch = 50000;
  for (uint32_t n : sizes) {
    const Data data = Clustered(n, nq, a.dim, 0x6d656d + n);
    kc::SessionOptions so;
    so.memory.gate_dim = a.dim;
    so.memory.payload_rows = kRows;
    so.memory.payload_dim = kDm;
    auto sid = cl.CreateSession(kc::Profile{1, 2, 1, 64, kvmem::DType::kBF16, {}, {}, "bench"}, so);
    if (!sid.ok()) {
      std::fprintf(stderr, "%s\n", sid.status().ToString().c_str());
      return 1;
    }
    std::vector<uint16_t> pay(size_t{kBatch} * kRows * kDm, kvmem::FloatToBF16(0.5f));
    const auto t0 = std::chrono::steady_clock::now();
    for (uint32_t at = 0; at < n; at += kBatch) {
      const uint32_t m = std::min(kBatch, n - at);
      kc::MemoryBlocksToPut put;
      put.gate_keys = kc::TensorView{&data.keys[size_t{at} * a.dim], kvmem::DType::kF32, {m, a.dim}};
      put.payloads = kc::TensorView{pay.data(), kvmem::DType::kBF16, {m, kRows, kDm}};
      put.span_starts.resize(m);
      put.span_ends.resize(m);
      for (uint32_t i = 0; i < m; ++i) {
        put.span_starts[i] = uint64_t{at + i} * 4096;
        put.span_ends[i] = uint64_t{at + i + 1} * 4096;
      }
      auto r = cl.PutMemoryBlocks(*sid, put);
      if (!r.ok()) {
        std::fprintf(stderr, "put: %s\n", r.status().ToString().c_str());
        return 1;
      }
    }
    const double put_s = Seconds(t0);
    std::map<std::string, std::vector<kc::MemorySelection>> got;
    std::map<std::string, double> us;
    const std::pair<const char*, kc::MemoryGate> gates[3] = {
        {"linear", kc::MemoryGate::kLinearScan},
        {"tree_exact", kc::MemoryGate::kTreeExact},
        {"tree_budget", kc::MemoryGate::kTreeBudget}};
    for (const auto& [name, gate] : gates) {
      for (int pass = 0; pass < 2; ++pass) {
        std::vector<kc::MemorySelection> res;
        const auto q0 = std::chrono::steady_clock::now();
        for (uint32_t i = 0; i < nq; ++i) {
          auto r = cl.SelectMemory(
              *sid, kc::TensorView{&data.queries[size_t{i} * a.dim], kvmem::DType::kF32, {a.dim}},
              a.k, gate, a.budget_leaves);
          if (!r.ok()) {
            std::fprintf(stderr, "select: %s\n", r.status().ToString().c_str());
            return 1;
          }
          res.push_back(std::move(*r));
        }
        us[name] = Seconds(q0) * 1e6 / nq;
        got[name] = std::move(res);
      }
    }
    for (const auto& [name, gate] : gates) {
      uint32_t agree = 0;
      double recall = 0, leaves = 0, keys = 0;
      const auto& lin = got["linear"];
      for (uint32_t i = 0; i < nq; ++i) {
        const auto& r = got[name][i];
        agree += r.ids == lin[i].ids && r.scores == lin[i].scores;
        size_t hit = 0;
        for (uint64_t id : r.ids) hit += std::count(lin[i].ids.begin(), lin[i].ids.end(), id);
        recall += double(hit) / lin[i].ids.size();
        leaves += r.leaves_visited;
        keys += r.keys_scored;
      }
      std::printf("%-10s %-9u %-12s %12.1f %9.3f %7.3f %9.1f %12.0f  (kvmemd; put %.1f s)\n",
                  "clustered", n, name, us[name], double(agree) / nq, recall / nq, leaves / nq,
                  keys / nq, put_s);
      results->push_back({{"data", "clustered"}, {"blocks", n}, {"method", name},
                          {"path", "kvmemd"}, {"us_per_query", us[name]},
                          {"exact_agreement", double(agree) / nq}, {"recall", recall / nq},
                          {"speedup_vs_linear", us["linear"] / us[name]},
                          {"leaves_visited", leaves / nq}, {"keys_scored", keys / nq},
                          {"put_seconds", put_s}, {"payload_bytes_per_block", kRows * kDm * 2}});
    }
    if (auto s = cl.DropSession(*sid); !s.ok()) {
      std::fprintf(stderr, "drop: %s\n", s.ToString().c_str());
      return 1;
    }
  }
  return 0;
}

int Main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", s.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (s == "--quick") a.quick = true;
    else if (s == "--json") a.json_path = next();
    else if (s == "--dim") a.dim = static_cast<uint32_t>(std::stoul(next()));
    else if (s == "--k") a.k = static_cast<uint32_t>(std::stoul(next()));
    else if (s == "--queries") a.queries = static_cast<uint32_t>(std::stoul(next()));
    else if (s == "--budget-leaves") a.budget_leaves = static_cast<uint32_t>(std::stoul(next()));
    else if (s == "--data") a.data = next();
    else if (s == "--radius-weight") a.radius_weight = std::stof(next());
    else if (s == "--sweep-budget") a.sweep = true;
    else if (s == "--e2e") a.e2e = true;
    else if (s == "--blocks") {
      std::string v = next() + ",", cur;
      for (char ch : v) {
        if (ch != ',') {
          cur.push_back(ch);
        } else if (!cur.empty()) {
          a.blocks.push_back(static_cast<uint32_t>(std::stoul(cur)));
          cur.clear();
        }
      }
    }
    else {
      std::fprintf(stderr,
                   "usage: kvmem-bench-memory [--quick] [--dim D] [--k K] [--queries N] "
                   "[--budget-leaves L] [--radius-weight W] [--data clustered|iid|both] "
                   "[--blocks N,N,...] [--sweep-budget] [--e2e] --json FILE\n");
      return 2;
    }
  }
  if (a.json_path.empty() || a.dim == 0 || a.k == 0 || a.budget_leaves == 0 ||
      (a.data != "clustered" && a.data != "iid" && a.data != "both")) {
    std::fprintf(stderr, "kvmem-bench-memory: --json FILE is required; dim, k, budget > 0\n");
    return 2;
  }
  const uint32_t nq = a.queries ? a.queries : (a.quick ? 100 : 200);
  const std::vector<uint32_t> sizes =
      a.quick ? std::vector<uint32_t>{10'000, 100'000} : std::vector<uint32_t>{10'000, 100'000, 1'000'000};
  const std::vector<uint32_t> run_sizes = a.blocks.empty() ? sizes : a.blocks;
  std::vector<std::string> kinds;
  if (a.data != "iid") kinds.push_back("clustered");
  if (a.data != "clustered") kinds.push_back("iid");

  json results = json::array();
  json sweep = json::array();
  std::printf("%-10s %-9s %-12s %12s %9s %7s %9s %12s\n", "data", "blocks", "method",
              "us/query", "exact", "recall", "leaves", "keys_scored");
  for (const std::string& kind : kinds) {
    for (uint32_t n : run_sizes) {
      const Data d = kind == "clustered" ? Clustered(n, nq, a.dim, 0x6d656d + n)
                                         : Iid(n, nq, a.dim, 0x696964 + n);
      std::vector<uint64_t> ids(n);
      for (uint32_t i = 0; i < n; ++i) ids[i] = i + 1;
      GateTree tree(a.dim);
      const auto t0 = std::chrono::steady_clock::now();
      if (auto s = tree.Insert(ids, d.keys); !s.ok()) {
        std::fprintf(stderr, "build failed: %s\n", s.ToString().c_str());
        return 1;
      }
      const double build_s = Seconds(t0);
      double us_lin = 0, us_ex = 0, us_bud = 0;
      const auto lin = RunMethod(d, a.dim, nq, [&](auto q) { return tree.Scan(q, a.k); }, &us_lin);
      const auto ex = RunMethod(d, a.dim, nq, [&](auto q) { return tree.SearchExact(q, a.k); }, &us_ex);
      const auto bud = RunMethod(
          d, a.dim, nq, [&](auto q) { return tree.SearchBudget(q, a.k, a.budget_leaves, a.radius_weight); }, &us_bud);
      auto row = [&](const char* method, const std::vector<GateResult>& res, double us) {
        uint32_t agree = 0;
        double recall = 0, leaves = 0, keys = 0, nodes = 0;
        for (uint32_t i = 0; i < nq; ++i) {
          agree += res[i].ids == lin[i].ids && res[i].scores == lin[i].scores;
          size_t hit = 0;
          for (uint64_t id : res[i].ids) hit += std::count(lin[i].ids.begin(), lin[i].ids.end(), id);
          recall += lin[i].ids.empty() ? 1.0 : double(hit) / lin[i].ids.size();
          leaves += res[i].cost.leaves_visited;
          keys += res[i].cost.keys_scored;
          nodes += res[i].cost.nodes_visited;
        }
        json j = {{"data", kind},
                  {"blocks", n},
                  {"method", method},
                  {"path", "in_process"},
                  {"us_per_query", us},
                  {"exact_agreement", double(agree) / nq},
                  {"recall", recall / nq},
                  {"speedup_vs_linear", us_lin / us},
                  {"leaves_visited", leaves / nq},
                  {"nodes_visited", nodes / nq},
                  {"keys_scored", keys / nq}};
        if (std::string(method) != "linear") {
          j["build_seconds"] = build_s;
          j["tree_leaves"] = tree.leaves();
          j["tree_depth"] = tree.depth();
          j["tree_memory_bytes"] = tree.memory_bytes();
        }
        if (std::string(method) == "tree_budget") j["budget_leaves"] = a.budget_leaves;
        std::printf("%-10s %-9u %-12s %12.1f %9.3f %7.3f %9.1f %12.0f\n", kind.c_str(), n,
                    method, us, double(agree) / nq, recall / nq, leaves / nq, keys / nq);
        results.push_back(std::move(j));
      };
      if (a.sweep) {
        // Budgeted walk: recall and cost per (leaf budget, soft-score weight); w = 1 ranks by
        // the bound (SearchExact's order).
        for (float w : {1.f, 0.75f, 0.5f, 0.35f, 0.25f, 0.f}) {
          for (uint32_t budget : {8u, 16u, 32u, 64u, 128u, 256u}) {
            double us = 0;
            const auto res = RunMethod(
                d, a.dim, nq, [&](auto q) { return tree.SearchBudget(q, a.k, budget, w); }, &us);
            double recall = 0, keys = 0, agree = 0;
            for (uint32_t i = 0; i < nq; ++i) {
              size_t hit = 0;
              for (uint64_t id : res[i].ids) hit += std::count(lin[i].ids.begin(), lin[i].ids.end(), id);
              recall += double(hit) / lin[i].ids.size();
              keys += res[i].cost.keys_scored;
              agree += res[i].ids == lin[i].ids;
            }
            std::printf("sweep %-10s %-8u w=%.2f budget=%-4u recall %.3f agree %.3f keys %.0f us %.1f\n",
                        kind.c_str(), n, w, budget, recall / nq, agree / nq, keys / nq, us);
            sweep.push_back({{"data", kind}, {"blocks", n}, {"radius_weight", w}, {"budget_leaves", budget},
                             {"recall", recall / nq}, {"exact_agreement", agree / nq},
                             {"keys_scored", keys / nq}, {"us_per_query", us}});
          }
        }
      }
      row("linear", lin, us_lin);
      row("tree_exact", ex, us_ex);
      row("tree_budget", bud, us_bud);
      std::printf("%-10s %-9u build %.2f s, %u leaves, depth %u\n", kind.c_str(), n, build_s,
                  tree.leaves(), tree.depth());
      std::fflush(stdout);
    }
  }
  if (a.e2e) {
    const std::vector<uint32_t> e2e_sizes =
        a.blocks.empty() ? std::vector<uint32_t>{10'000, 100'000} : a.blocks;
    if (int rc = RunE2E(a, e2e_sizes, nq, &results); rc != 0) return rc;
  }
  json out;
  out["machine"] = "2-core Debian 12 VM (shared with other builds), g++ 12, RelWithDebInfo (-O2), "
                   "one thread";
  out["commit"] = kvmem::bench::GitCommit();
  out["parameters"] = {{"dim", a.dim},
                       {"k", a.k},
                       {"queries", nq},
                       {"budget_leaves", a.budget_leaves},
                       {"radius_weight", a.radius_weight},
                       {"quick", a.quick},
                       {"tree", {{"leaf_points", kvmem::index::GateTreeOptions{}.leaf_points},
                                 {"fanout", kvmem::index::GateTreeOptions{}.fanout}}},
                       {"clustered", {{"topics", 1024}, {"subtopics_per_topic", 16},
                                      {"subtopic_sigma", 0.35}, {"key_sigma", 0.25},
                                      {"query_sigma", 0.5}, {"outlier_channels", "every 16th x3"},
                                      {"shared_offset_sigma", 0.5}}}};
  out["results"] = results;
  if (a.sweep) out["budget_sweep"] = sweep;
  std::ofstream f(a.json_path);
  f << out.dump(2) << "\n";
  if (!f) {
    std::fprintf(stderr, "cannot write %s\n", a.json_path.c_str());
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return Main(argc, argv); }
