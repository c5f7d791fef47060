#include "daemon/sd_notify.h"

#ifdef KVMEM_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

namespace kvmem::sd {

#ifdef KVMEM_HAVE_SYSTEMD
bool Notify(const std::string& state) { return sd_notify(0, state.c_str()) > 0; }

std::chrono::microseconds WatchdogInterval() {
  uint64_t usec = 0;
  if (sd_watchdog_enabled(0, &usec) <= 0) return std::chrono::microseconds(0);
  return std::chrono::microseconds(usec);
}

bool Compiled() { return true; }
#else
bool Notify(const std::string&) { return false; }
std::chrono::microseconds WatchdogInterval() { return std::chrono::microseconds(0); }
bool Compiled() { return false; }
#endif

}  // namespace kvmem::sd
