// Logging macros over spdlog. Use these, never spdlog directly, so the sink, format and level
// are set in one place (InitLogging) and can be reloaded (SIGHUP).
#pragma once

#include <spdlog/spdlog.h>

#include <string_view>

#include "common/status.h"

namespace kvmem {

// Sets up the process logger: stderr, "[time] [level] [thread] message". `level` is one of
// trace, debug, info, warn, error, critical, off.
Status InitLogging(std::string_view level);
Status SetLogLevel(std::string_view level);

}  // namespace kvmem

#define KVMEM_LOG_TRACE(...) SPDLOG_TRACE(__VA_ARGS__)
#define KVMEM_LOG_DEBUG(...) ::spdlog::debug(__VA_ARGS__)
#define KVMEM_LOG_INFO(...) ::spdlog::info(__VA_ARGS__)
#define KVMEM_LOG_WARN(...) ::spdlog::warn(__VA_ARGS__)
#define KVMEM_LOG_ERROR(...) ::spdlog::error(__VA_ARGS__)
