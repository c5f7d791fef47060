// systemd integration (Type=notify): readiness, stopping and watchdog pings. Compiles to no-ops
// when the build has no libsystemd (KVMEM_HAVE_SYSTEMD undefined) and does nothing when the
// daemon was not started by systemd (NOTIFY_SOCKET unset).
#pragma once

#include <chrono>
#include <string>

namespace kvmem::sd {

// Sends a state string ("READY=1", "STOPPING=1", "WATCHDOG=1", "RELOADING=1", "STATUS=...").
// Returns false when no notification socket exists or the send failed.
bool Notify(const std::string& state);

// The watchdog interval systemd expects pings within (WatchdogSec=), or 0 when disabled.
std::chrono::microseconds WatchdogInterval();

// True when the build links libsystemd.
bool Compiled();

}  // namespace kvmem::sd
