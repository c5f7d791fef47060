// Runs kvmem-stress against a kvmemd it spawns and checks its report: the short run of the fast
// suite (stress_test) and the soak of the slow one (soak_test) assert the same things.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "testing/daemon_process.h"

namespace kvmem::testing {

struct StressRun {
  std::string command;
  int exit_status = -1;
  nlohmann::json report;  // empty when the tool wrote none
};

// kvmem-stress --spawn ARGS --json TMP; its output goes to /dev/null (the report has it all).
inline StressRun RunStress(const std::string& args) {
  const auto json = std::filesystem::temp_directory_path() /
                    ("kvmem-stress-" + std::to_string(::getpid()) + ".json");
  const std::string cmd = BinDir() + "/kvmem-stress --spawn " + args + " --json " +
                          json.string() + " > /dev/null 2>&1";
  StressRun run;
  run.command = cmd;
  run.exit_status = std::system(cmd.c_str());
  std::ifstream in(json);
  if (in.good()) run.report = nlohmann::json::parse(in);
  std::filesystem::remove(json);
  return run;
}

// What any run must show: it ran every operation, disconnected clients with requests in
// flight, lost no acknowledged token, met no unexpected error or reference mismatch (dense and
// index-mode sessions alike), and left a daemon that closed every endpoint, saw no operation
// stall (executor_stall_seconds) or device failure, and exited 0 on SIGTERM.
inline void ExpectNothingLost(const StressRun& run, uint64_t min_ops) {
  const nlohmann::json& j = run.report;
  ASSERT_FALSE(j.is_null()) << "no report from: " << run.command;
  EXPECT_EQ(run.exit_status, 0) << j.dump(2);
  EXPECT_TRUE(j["unexpected_errors"].empty()) << j["unexpected_error_samples"].dump();
  EXPECT_TRUE(j["verify_ok"].get<bool>());
  EXPECT_EQ(j["lost_acknowledged_tokens"], 0);
  EXPECT_EQ(j["reference_failures"], 0);
  EXPECT_EQ(j["daemon_exit_status"], 0);
  EXPECT_EQ(j["daemon_endpoints_open_at_end"], 0);
  EXPECT_EQ(j["daemon_executor_stalls"], 0);  // no operation held a thread past the watchdog's limit
  EXPECT_EQ(j["daemon_device_failures"], 0);
  EXPECT_GT(j["ops"].get<uint64_t>(), min_ops);
  EXPECT_GT(j["disconnects"].get<uint64_t>(), 0u);
  EXPECT_GT(j["reference_checks"].get<uint64_t>(), 0u);
  EXPECT_GT(j["acknowledged_tokens"].get<uint64_t>(), 0u);
  for (const char* op : {"append", "attend", "retrieve", "drop", "info"}) {
    EXPECT_GT(j["ops_per_op"][op].get<uint64_t>(), 0u) << op;
    EXPECT_TRUE(j["p99_us"].contains(op)) << op;
  }
  EXPECT_GT(j["rss_baseline_bytes"].get<uint64_t>(), 0u);
  // Index-mode sessions (--index-fraction): some were created, and their reference checks (a
  // budget over every token: equal to dense attention) are among those above.
  if (j["index_fraction"].get<double>() > 0) {
    EXPECT_GT(j["index_sessions_created"].get<uint64_t>(), 0u);
  }
}

}  // namespace kvmem::testing
