// Starts a real kvmemd binary on a free loopback port for integration tests, and stops it
// with SIGTERM (checking that it exits 0, i.e. shuts down gracefully).
#pragma once

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "client/client.h"

namespace kvmem::testing {

// A loopback TCP port that was free a moment ago, for a kvmemd listener of a test. Picked below
// the kernel's ephemeral range (net.ipv4.ip_local_port_range), not by binding port 0: a port
// from that range can be taken in the meantime as the local port of any outgoing connection of
// the tests running in parallel (a test flaked with "Address already in use" on its admin
// port). Candidates are random per process, thread and call, each checked by binding it.
inline uint16_t FreePort() {
  auto try_bind = [](uint16_t port) -> uint16_t {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return 0;
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    uint16_t got = 0;
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
      socklen_t len = sizeof a;
      if (::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) got = ntohs(a.sin_port);
    }
    ::close(fd);
    return got;
  };
  uint32_t lo = 32768, hi = 60999;  // Linux's default ephemeral range
  if (FILE* f = std::fopen("/proc/sys/net/ipv4/ip_local_port_range", "r")) {
    if (std::fscanf(f, "%u %u", &lo, &hi) != 2) lo = 32768, hi = 60999;
    std::fclose(f);
  }
  // The larger gap outside [lo, hi] within [10000, 65535].
  uint32_t a = 10000, b = lo > 10000 ? lo - 1 : 10000;
  if (hi + 1 <= 65535 && 65535 - (hi + 1) > b - a) a = hi + 1, b = 65535;
  thread_local std::mt19937 rng(
      static_cast<uint32_t>(::getpid()) * 2654435761u ^
      static_cast<uint32_t>(std::hash<std::thread::id>{}(std::this_thread::get_id())) ^
      static_cast<uint32_t>(std::chrono::steady_clock::now().time_since_epoch().count()));
  if (b > a + 100) {
    std::uniform_int_distribution<uint32_t> pick(a, b);
    for (int i = 0; i < 200; ++i) {
      if (const uint16_t p = try_bind(static_cast<uint16_t>(pick(rng)))) return p;
    }
  }
  return try_bind(0);  // no room outside the ephemeral range: any free port
}

// Tests and benchmarks live next to kvmemd in build/bin.
inline std::string BinDir() {
  std::error_code ec;
  auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string("build/bin") : self.parent_path().string();
}

// Runs kvmemctl (next to the test binary) with `args` and returns its stdout; *rc gets the
// exit status.
inline std::string Kvmemctl(const std::string& args, int* rc) {
  const std::string cmd = BinDir() + "/kvmemctl " + args + " 2>/dev/null";
  std::string out;
  FILE* f = ::popen(cmd.c_str(), "r");
  if (f == nullptr) return out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  const int st = ::pclose(f);
  *rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

class DaemonProcess {
 public:
  // Extra flags are appended to kvmemd's command line.
  explicit DaemonProcess(std::vector<std::string> extra = {}, std::string token = "") : token_(std::move(token)) {
    port_ = FreePort();
    address_ = "127.0.0.1:" + std::to_string(port_);
    data_dir_ = std::filesystem::temp_directory_path() / ("kvmem-test-" + std::to_string(::getpid()) + "-" + std::to_string(port_));
    std::filesystem::create_directories(data_dir_);
    std::vector<std::string> args = {BinDir() + "/kvmemd", "--listen", address_, "--data-dir", data_dir_.string(),
                                     "--log-level", "warn"};
    for (auto& e : extra) args.push_back(e);
    // The admin port defaults to a fixed 7421; tests run in parallel, so it is off unless asked.
    if (std::find(extra.begin(), extra.end(), "--admin") == extra.end()) {
      args.push_back("--admin");
      args.push_back("off");
    }
    pid_ = ::fork();
    if (pid_ == 0) {
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      std::perror("execv kvmemd");
      ::_exit(127);
    }
    // Ready when a client can connect. Generous: a restart that replays a durable store can
    // take several seconds on a loaded 2-core CI machine (the durability tests flaked at 10 s).
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < deadline) {
      client::ClientOptions o;
      o.connect_timeout_ms = 300;
      o.token = token_;
      if (client::Client::Connect(address_, o).ok()) {
        ready_ = true;
        break;
      }
      int st = 0;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

  ~DaemonProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    std::error_code ec;
    std::filesystem::remove_all(data_dir_, ec);
  }

  // SIGTERM; returns the exit status if it exits within `timeout`, -1 otherwise.
  int Stop(std::chrono::milliseconds timeout = std::chrono::milliseconds(5000)) {
    if (pid_ <= 0) return -1;
    ::kill(pid_, SIGTERM);
    return WaitExit(timeout);
  }

  // Waits for kvmemd to exit on its own; its exit status (128 + signal when killed), or -1 if it
  // still runs after `timeout`.
  int WaitExit(std::chrono::milliseconds timeout) {
    if (pid_ <= 0) return -1;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      int st = 0;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return -1;
  }

  bool ready() const { return ready_; }
  const std::string& address() const { return address_; }
  uint16_t port() const { return port_; }
  pid_t pid() const { return pid_; }
  const std::filesystem::path& data_dir() const { return data_dir_; }

 private:
  std::string token_;
  uint16_t port_ = 0;
  std::string address_;
  std::filesystem::path data_dir_;
  pid_t pid_ = -1;
  bool ready_ = false;
};

}  // namespace kvmem::testing
