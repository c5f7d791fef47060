// kvmem-stress end to end for a few seconds against a kvmemd it spawns: random disconnects
// with requests in flight, then every session verified. Zero unexpected errors and no lost
// acknowledged write are required; the RSS figures are reported, not asserted (a few seconds
// is too short for caches to settle; bench/results/stress.json has the 10-minute run).
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "testing/daemon_process.h"

namespace kvmem {
namespace {

TEST(Stress, ShortMixedLoadWithDisconnectsLosesNothing) {
  const auto json = std::filesystem::temp_directory_path() /
                    ("kvmem-stress-" + std::to_string(::getpid()) + ".json");
  const std::string cmd = testing::BinDir() +
                          "/kvmem-stress --spawn --clients 4 --sessions 8 --duration 4 --warmup 1"
                          " --settle 1 --disconnect-rate 0.05 --reference-rate 0.1 --json " +
                          json.string() + " > /dev/null 2>&1";
  const int rc = std::system(cmd.c_str());
  std::ifstream in(json);
  ASSERT_TRUE(in.good()) << "no report from: " << cmd;
  const nlohmann::json j = nlohmann::json::parse(in);
  std::filesystem::remove(json);
  EXPECT_EQ(rc, 0) << j.dump(2);
  EXPECT_TRUE(j["unexpected_errors"].empty()) << j["unexpected_error_samples"].dump();
  EXPECT_TRUE(j["verify_ok"].get<bool>());
  EXPECT_EQ(j["lost_acknowledged_tokens"], 0);
  EXPECT_EQ(j["reference_failures"], 0);
  EXPECT_EQ(j["daemon_exit_status"], 0);
  EXPECT_EQ(j["daemon_endpoints_open_at_end"], 0);
  EXPECT_GT(j["ops"].get<uint64_t>(), 100u);
  EXPECT_GT(j["disconnects"].get<uint64_t>(), 0u);
  EXPECT_GT(j["reference_checks"].get<uint64_t>(), 0u);
  EXPECT_GT(j["acknowledged_tokens"].get<uint64_t>(), 0u);
  for (const char* op : {"append", "attend", "retrieve", "drop", "info"}) {
    EXPECT_GT(j["ops_per_op"][op].get<uint64_t>(), 0u) << op;
    EXPECT_TRUE(j["p99_us"].contains(op)) << op;
  }
  EXPECT_GT(j["rss_baseline_bytes"].get<uint64_t>(), 0u);
}

}  // namespace
}  // namespace kvmem
