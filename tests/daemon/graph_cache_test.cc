// GraphCache (daemon/graph_cache.h): the policy of kvmemd's CUDA graph cache, with integers for
// graph handles and a destroy that records what it was given.
#include "daemon/graph_cache.h"

#include <gtest/gtest.h>

#include <vector>

namespace kvmem {
namespace {

struct Recorder {
  std::vector<int>* destroyed;
  void operator()(int exec) const { destroyed->push_back(exec); }
};
using Cache = GraphCache<int, int, Recorder>;
using Action = Cache::Action;

TEST(GraphCacheTest, ALayoutIsSubmittedDirectlyThenCapturedThenReplayed) {
  std::vector<int> destroyed;
  Cache c(4, 8, Recorder{&destroyed});
  int exec = -1;
  EXPECT_EQ(c.Find(7, &exec), Action::kDirect);
  EXPECT_EQ(c.Find(7, &exec), Action::kCapture);
  c.Insert(7, 700);
  for (int i = 0; i < 3; ++i) {
    exec = -1;
    EXPECT_EQ(c.Find(7, &exec), Action::kReplay);
    EXPECT_EQ(exec, 700);
  }
  // A capture that failed (no Insert): the next use starts over with a direct submission.
  EXPECT_EQ(c.Find(8, &exec), Action::kDirect);
  EXPECT_EQ(c.Find(8, &exec), Action::kCapture);
  EXPECT_EQ(c.Find(8, &exec), Action::kDirect);
  EXPECT_TRUE(destroyed.empty());
}

TEST(GraphCacheTest, LayoutsThatNeverRepeatAreNeverCaptured) {
  std::vector<int> destroyed;
  Cache c(4, 8, Recorder{&destroyed});
  int exec = -1;
  for (int key = 0; key < 100; ++key) EXPECT_EQ(c.Find(key, &exec), Action::kDirect) << key;
  EXPECT_EQ(c.size(), 0u);
  // The sightings waiting for a second use are bounded: past 8 they are forgotten at once, so
  // key 99 (seen after the last reset) is remembered and key 0 is not.
  EXPECT_EQ(c.Find(99, &exec), Action::kCapture);
  EXPECT_EQ(c.Find(0, &exec), Action::kDirect);
}

TEST(GraphCacheTest, AFullCacheDropsTheLeastRecentlyUsedGraph) {
  std::vector<int> destroyed;
  Cache c(3, 8, Recorder{&destroyed});
  int exec = -1;
  for (int key = 1; key <= 3; ++key) {
    ASSERT_EQ(c.Find(key, &exec), Action::kDirect);
    ASSERT_EQ(c.Find(key, &exec), Action::kCapture);
    c.Insert(key, key * 100);
  }
  // Replays make 1 the most recent and 2 the least.
  ASSERT_EQ(c.Find(2, &exec), Action::kReplay);
  ASSERT_EQ(c.Find(3, &exec), Action::kReplay);
  ASSERT_EQ(c.Find(1, &exec), Action::kReplay);
  ASSERT_EQ(c.Find(4, &exec), Action::kDirect);
  ASSERT_EQ(c.Find(4, &exec), Action::kCapture);
  c.Insert(4, 400);
  EXPECT_EQ(destroyed, std::vector<int>{200});
  EXPECT_EQ(c.size(), 3u);
  for (int key : {1, 3, 4}) {
    EXPECT_EQ(c.Find(key, &exec), Action::kReplay) << key;
    EXPECT_EQ(exec, key * 100);
  }
  EXPECT_EQ(c.Find(2, &exec), Action::kDirect);  // dropped, and its sighting long gone
}

TEST(GraphCacheTest, ClearDestroysEveryGraphAndForgetsEverySighting) {
  std::vector<int> destroyed;
  {
    Cache c(4, 8, Recorder{&destroyed});
    int exec = -1;
    for (int key = 1; key <= 2; ++key) {
      c.Find(key, &exec);
      c.Find(key, &exec);
      c.Insert(key, key * 10);
    }
    c.Find(5, &exec);  // seen once
    c.Clear();
    EXPECT_EQ(destroyed, (std::vector<int>{10, 20}));
    EXPECT_EQ(c.size(), 0u);
    // After a buffer was reallocated nothing old is replayed, and every layout starts over.
    EXPECT_EQ(c.Find(1, &exec), Action::kDirect);
    EXPECT_EQ(c.Find(5, &exec), Action::kDirect);
    EXPECT_EQ(c.Find(1, &exec), Action::kCapture);
    c.Insert(1, 11);
  }
  // The destructor destroys what is left.
  EXPECT_EQ(destroyed, (std::vector<int>{10, 20, 11}));
}

TEST(GraphCacheTest, InsertingAKeyAgainReplacesItsGraph) {
  std::vector<int> destroyed;
  Cache c(4, 8, Recorder{&destroyed});
  int exec = -1;
  c.Find(1, &exec);
  c.Find(1, &exec);
  c.Insert(1, 10);
  c.Insert(1, 11);
  EXPECT_EQ(destroyed, std::vector<int>{10});
  ASSERT_EQ(c.Find(1, &exec), Action::kReplay);
  EXPECT_EQ(exec, 11);
}

}  // namespace
}  // namespace kvmem
