// The slow suite's soak (`make test-slow`): kvmem-stress for 90 s with 16 clients after a 30 s
// warm-up at the same load. Besides what the short run of the fast suite checks (nothing lost,
// no unexpected error, every endpoint closed, a clean exit) it bounds the daemon's idle RSS
// growth over the post-warm-up baseline. The bound is loose (a leak, not cache warm-up: a 30 s
// warm-up leaves RocksDB's 8 MiB block cache part full, so a few MiB of growth over a ~30 MiB
// baseline is expected); the soak of record (docs/reliability.md, 10 minutes after a 180 s
// warm-up) is what the < 5 % target is measured on.
#include <gtest/gtest.h>

#include "testing/stress_run.h"

namespace kvmem {
namespace {

TEST(Soak, NinetySecondsOfMixedLoadLoseNothingAndLeakNothing) {
  const auto run = testing::RunStress(
      "--clients 16 --sessions 32 --duration 90 --warmup 30 --settle 45 --disconnect-rate 0.02"
      " --reference-rate 0.05 --index-fraction 0.25");
  testing::ExpectNothingLost(run, 10000);
  if (run.report.is_null()) return;
  const double growth = run.report["rss_growth_pct"].get<double>();
  std::printf("rss: start %.1f MiB, baseline %.1f MiB, end %.1f MiB (%+.1f%%), peak %.1f MiB\n",
              run.report["rss_start_bytes"].get<double>() / 1048576.0,
              run.report["rss_baseline_bytes"].get<double>() / 1048576.0,
              run.report["rss_end_bytes"].get<double>() / 1048576.0, growth,
              run.report["rss_peak_bytes"].get<double>() / 1048576.0);
  // Both readings in the same state (sessions dropped, 1 s after kvmemd's idle trim): with a
  // 15 s settle the baseline was read before the trim (244 MiB against an end of 57 MiB, a
  // growth of -76% that would hide any leak); 45 s leaves room (here: 30.6 and 33.8 MiB).
  EXPECT_TRUE(run.report["rss_readings_after_idle_trim"].get<bool>())
      << "an RSS reading was taken before kvmemd's idle trim; the comparison means nothing";
  EXPECT_LT(growth, 50.0) << "idle RSS grew by half over the post-warm-up baseline";
}

}  // namespace
}  // namespace kvmem
