// kvmem-stress end to end for a few seconds against a kvmemd it spawns: random disconnects
// with requests in flight, then every session verified. Zero unexpected errors and no lost
// acknowledged write are required; the RSS figures are reported, not asserted (a few seconds
// is too short for caches to settle; soak_test, in the slow suite, bounds them over a longer
// run, and bench/results/stress.json has the 10-minute run).
#include <gtest/gtest.h>

#include "testing/stress_run.h"

namespace kvmem {
namespace {

TEST(Stress, ShortMixedLoadWithDisconnectsLosesNothing) {
  const auto run = testing::RunStress(
      "--clients 4 --sessions 8 --duration 4 --warmup 1 --settle 1 --disconnect-rate 0.05"
      " --reference-rate 0.1 --index-fraction 0.25");
  testing::ExpectNothingLost(run, 100);
}

}  // namespace
}  // namespace kvmem
