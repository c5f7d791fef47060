// SIGHUP: re-read the configuration and apply what can change while sessions live.
//
// Reloaded: log_level, tenants (tokens; checked at Hello, so existing connections keep their
// tenant and new connections use the new tokens), max_sessions_per_tenant,
// max_tokens_per_session. Everything else (listen, admin, data_dir, backend, memory sizes,
// executors, search_threads, progress, ucx_error_mode, session_defaults) needs a restart: a
// change is logged as ignored. A configuration that fails to load or validate changes nothing.
#pragma once

#include <string>
#include <vector>

#include "common/status.h"
#include "daemon/config.h"

namespace kvmem {

class Service;

// Applies fresh's reloadable settings to the logger and *service. `current` is the running
// configuration; on OK it is updated to carry the reloaded values. Returns the names of the
// settings that changed in fresh but need a restart in *ignored.
Status ApplyReload(const DaemonConfig& fresh, DaemonConfig* current, Service* service,
                   std::vector<std::string>* ignored);

}  // namespace kvmem
