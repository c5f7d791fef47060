#include "common/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <string>

namespace kvmem {

Status SetLogLevel(std::string_view level) {
  auto lvl = spdlog::level::from_str(std::string(level));
  if (lvl == spdlog::level::off && level != "off") {
    return InvalidArgument("unknown log level '" + std::string(level) +
                           "' (trace, debug, info, warn, error, critical, off)");
  }
  spdlog::set_level(lvl);
  return Status::OK();
}

Status InitLogging(std::string_view level) {
  static bool initialised = false;
  if (!initialised) {
    auto logger = spdlog::stderr_color_mt("kvmem");
    spdlog::set_default_logger(logger);
    spdlog::set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] [%t] %v");
    spdlog::flush_on(spdlog::level::warn);
    initialised = true;
  }
  return SetLogLevel(level);
}

}  // namespace kvmem
