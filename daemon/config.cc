#include "daemon/config.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "common/units.h"
#include "wire/ucx.h"

namespace kvmem {

uint32_t DefaultSearchThreads() {
  const unsigned cores = std::thread::hardware_concurrency();
  return cores >= 4 ? std::min(7u, cores / 2 - 1) : 0u;
}

bool IsLoopbackHost(const std::string& host) {
  return host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0;
}

Status DaemonConfig::Validate() const {
  std::string host;
  uint16_t port = 0;
  KVMEM_RETURN_IF_ERROR(ucx::ParseHostPort(listen, &host, &port).WithContext("listen"));
  if (tenants.empty() && !IsLoopbackHost(host)) {
    return InvalidArgument("listen " + listen +
                           " is not a loopback address and no tenant tokens are configured; "
                           "add \"tenants\" to the config file or listen on 127.0.0.1");
  }
  if (admin != "off") {
    std::string admin_host;
    uint16_t admin_port = 0;
    KVMEM_RETURN_IF_ERROR(ucx::ParseHostPort(admin, &admin_host, &admin_port).WithContext("admin"));
    if (admin_token.empty() && !IsLoopbackHost(admin_host)) {
      return InvalidArgument("admin " + admin +
                             " is not a loopback address and no admin_token is configured; "
                             "set \"admin_token\" in the config file or bind the admin port to "
                             "127.0.0.1");
    }
  }
  if (backend != "auto" && backend != "cpu" && backend != "cuda") {
    return InvalidArgument("backend must be auto, cpu or cuda, got '" + backend + "'");
  }
  if (progress != "event" && progress != "poll") {
    return InvalidArgument("progress must be event or poll, got '" + progress + "'");
  }
  if (on_executor_stall != "report" && on_executor_stall != "exit") {
    return InvalidArgument("on_executor_stall must be report or exit, got '" + on_executor_stall + "'");
  }
  if (on_device_failure != "report" && on_device_failure != "exit") {
    return InvalidArgument("on_device_failure must be report or exit, got '" + on_device_failure + "'");
  }
  if (ucx_error_mode != "none" && ucx_error_mode != "peer") {
    return InvalidArgument("ucx_error_mode must be none or peer, got '" + ucx_error_mode + "'");
  }
  if (ucx_rndv_scheme != "auto" && ucx_rndv_scheme != "get_zcopy" && ucx_rndv_scheme != "put_zcopy") {
    return InvalidArgument("ucx_rndv_scheme must be auto, get_zcopy or put_zcopy, got '" +
                           ucx_rndv_scheme + "'");
  }
  if (executors > 256) return InvalidArgument("executors must be <= 256");
  if (max_connections == 0) return InvalidArgument("max_connections must be >= 1");
  if (max_inflight_per_endpoint == 0) return InvalidArgument("max_inflight_per_endpoint must be >= 1");
  if (restore != "eager" && restore != "lazy") {
    return InvalidArgument("restore must be eager or lazy, got '" + restore + "'");
  }
  if (!(low_watermark > 0 && low_watermark < high_watermark && high_watermark <= 1)) {
    return InvalidArgument("watermarks must satisfy 0 < low_watermark < high_watermark <= 1, got " +
                           std::to_string(low_watermark) + " and " + std::to_string(high_watermark));
  }
  if (max_message_bytes < 4096) return InvalidArgument("max_message_bytes must be >= 4096");
  KVMEM_RETURN_IF_ERROR(ValidateOptions(session_defaults).WithContext("session defaults"));
  return Status::OK();
}

namespace {

Status ReadBytes(const nlohmann::json& v, const char* key, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return Status::OK();
  }
  if (v.is_string()) {
    KVMEM_ASSIGN_OR_RETURN(*out, ParseBytes(v.get<std::string>()));
    return Status::OK();
  }
  return InvalidArgument(std::string("config: ") + key + " must be a size like \"4GiB\"");
}

}  // namespace

namespace {
Status LoadConfigFileAt(const std::string& path, DaemonConfig* c, int depth);
}  // namespace

Status LoadConfigFile(const std::string& path, DaemonConfig* c) {
  return LoadConfigFileAt(path, c, 0);
}

namespace {

Status LoadConfigFileAt(const std::string& path, DaemonConfig* c, int depth) {
  std::ifstream in(path);
  if (!in) return NotFound("config file '" + path + "' cannot be opened");
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false,
                                           /*ignore_comments=*/true);
  if (j.is_discarded() || !j.is_object()) {
    return InvalidArgument("config file '" + path + "' is not a JSON object");
  }
  auto str = [&](const nlohmann::json& v, const std::string& k, std::string* out) -> Status {
    if (!v.is_string()) return InvalidArgument("config: " + k + " must be a string");
    *out = v.get<std::string>();
    return Status::OK();
  };
  auto u32 = [&](const nlohmann::json& v, const std::string& k, uint32_t* out) -> Status {
    if (!v.is_number_unsigned() || v.get<uint64_t>() > 0xffffffffull) {
      return InvalidArgument("config: " + k + " must be a non-negative integer");
    }
    *out = v.get<uint32_t>();
    return Status::OK();
  };
  // Included files first: they are the base that this file's own keys override, whatever the
  // keys' order (nlohmann::json objects iterate in key order, so "include" would otherwise land
  // between "admin" and "listen").
  std::vector<nlohmann::json::const_iterator> items;
  if (const auto inc = j.find("include"); inc != j.end()) items.push_back(inc);
  for (auto it = j.cbegin(); it != j.cend(); ++it) {
    if (it.key() != "include") items.push_back(it);
  }
  for (const auto& it : items) {
    const std::string& k = it.key();
    const nlohmann::json& v = it.value();
    Status s;
    if (k == "listen") s = str(v, k, &c->listen);
    else if (k == "data_dir") s = str(v, k, &c->data_dir);
    else if (k == "backend") s = str(v, k, &c->backend);
    else if (k == "log_level") s = str(v, k, &c->log_level);
    else if (k == "progress") s = str(v, k, &c->progress);
    else if (k == "ucx_error_mode") s = str(v, k, &c->ucx_error_mode);
    else if (k == "ucx_rndv_scheme") s = str(v, k, &c->ucx_rndv_scheme);
    else if (k == "admin") s = str(v, k, &c->admin);
    else if (k == "admin_token") s = str(v, k, &c->admin_token);
    else if (k == "executors") s = u32(v, k, &c->executors);
    else if (k == "max_inflight_per_endpoint") s = u32(v, k, &c->max_inflight_per_endpoint);
    else if (k == "max_connections") s = u32(v, k, &c->max_connections);
    else if (k == "client_idle_timeout_seconds") s = u32(v, k, &c->client_idle_timeout_seconds);
    else if (k == "idle_trim_seconds") s = u32(v, k, &c->idle_trim_seconds);
    else if (k == "executor_stall_seconds") s = u32(v, k, &c->executor_stall_seconds);
    else if (k == "on_executor_stall") s = str(v, k, &c->on_executor_stall);
    else if (k == "on_device_failure") s = str(v, k, &c->on_device_failure);
    else if (k == "loop_stall_seconds") s = u32(v, k, &c->loop_stall_seconds);
    else if (k == "malloc_arena_max") s = u32(v, k, &c->malloc_arena_max);
    else if (k == "store_block_cache") s = ReadBytes(v, "store_block_cache", &c->store_block_cache_bytes);
    else if (k == "max_sessions_per_tenant") s = u32(v, k, &c->max_sessions_per_tenant);
    else if (k == "search_threads") s = u32(v, k, &c->search_threads);
    else if (k == "device_memory") s = ReadBytes(v, "device_memory", &c->device_memory_bytes);
    else if (k == "host_memory") s = ReadBytes(v, "host_memory", &c->host_memory_bytes);
    else if (k == "restore") s = str(v, k, &c->restore);
    else if (k == "tenant_memory_quota") {
      s = ReadBytes(v, "tenant_memory_quota", &c->tenant_memory_quota_bytes);
    } else if (k == "high_watermark" || k == "low_watermark") {
      if (!v.is_number()) s = InvalidArgument("config: " + k + " must be a number in (0, 1]");
      else (k == "high_watermark" ? c->high_watermark : c->low_watermark) = v.get<double>();
    } else if (k == "tenant_memory_quotas") {
      // {"tenant_memory_quotas": {"acme": "8GiB", "beta": 1073741824}}
      if (!v.is_object()) {
        s = InvalidArgument("config: tenant_memory_quotas must map tenant names to sizes");
      } else {
        c->tenant_memory_quotas.clear();
        for (auto t = v.begin(); t != v.end() && s.ok(); ++t) {
          const std::string key = "tenant_memory_quotas." + t.key();
          s = ReadBytes(t.value(), key.c_str(), &c->tenant_memory_quotas[t.key()]);
        }
      }
    }
    else if (k == "max_message_bytes") s = ReadBytes(v, "max_message_bytes", &c->max_message_bytes);
    else if (k == "memory_scorer_dir") s = str(v, k, &c->memory_scorer_dir);
    else if (k == "memory_scorer_file") s = str(v, k, &c->memory_scorer_file);
    else if (k == "memory_max_blocks_per_session") {
      if (!v.is_number_unsigned()) s = InvalidArgument("config: memory_max_blocks_per_session must be an integer");
      else c->memory_max_blocks_per_session = v.get<uint64_t>();
    } else if (k == "max_tokens_per_session") {
      if (!v.is_number_unsigned()) s = InvalidArgument("config: max_tokens_per_session must be an integer");
      else c->max_tokens_per_session = v.get<uint64_t>();
    } else if (k == "tenants") {
      // {"tenants": {"<token>": "<tenant>", ...}}
      if (!v.is_object()) {
        s = InvalidArgument("config: tenants must map tokens to tenant names");
      } else {
        c->tenants.clear();
        for (auto t = v.begin(); t != v.end() && s.ok(); ++t) {
          if (!t.value().is_string() || t.key().size() < 8) {
            s = InvalidArgument("config: each tenant token must be >= 8 characters and map to a name");
          } else {
            c->tenants[t.key()] = t.value().get<std::string>();
          }
        }
      }
    } else if (k == "include") {
      // {"include": "secrets.json"} or a list: loaded in order before this file's other keys,
      // which override them; relative paths are relative to this file (e.g. tokens mounted from a Kubernetes Secret).
      std::vector<std::string> files;
      if (v.is_string()) files.push_back(v.get<std::string>());
      else if (v.is_array()) {
        for (const auto& f : v) {
          if (f.is_string()) files.push_back(f.get<std::string>());
          else s = InvalidArgument("config: include must be a path or a list of paths");
        }
      } else {
        s = InvalidArgument("config: include must be a path or a list of paths");
      }
      if (s.ok() && depth >= 4) s = InvalidArgument("config: include nested too deeply");
      for (const auto& f : files) {
        if (!s.ok()) break;
        std::filesystem::path fp(f);
        if (fp.is_relative()) fp = std::filesystem::path(path).parent_path() / fp;
        s = LoadConfigFileAt(fp.string(), c, depth + 1);
      }
    } else if (k == "retrieval_head_masks") {
      // {"retrieval_head_masks": {"<profile name>": "<mask file>", ...}}
      if (!v.is_object()) s = InvalidArgument("config: retrieval_head_masks must map profile names to files");
      for (auto m = v.begin(); s.ok() && m != v.end(); ++m) {
        if (!m.value().is_string()) {
          s = InvalidArgument("config: retrieval_head_masks." + m.key() + " must be a file path");
          break;
        }
        std::filesystem::path fp(m.value().get<std::string>());
        if (fp.is_relative()) fp = std::filesystem::path(path).parent_path() / fp;
        auto mask = LoadHeadMaskFile(fp.string());
        if (!mask.ok()) {
          s = mask.status().WithContext("retrieval_head_masks." + m.key());
        } else {
          c->retrieval_head_masks[m.key()] = std::move(*mask);
        }
      }
    } else if (k == "session_defaults") {
      if (!v.is_object()) s = InvalidArgument("config: session_defaults must be an object");
      for (auto d = v.begin(); s.ok() && d != v.end(); ++d) {
        SessionOptions& o = c->session_defaults;
        if (d.key() == "chunk_min_tokens") s = u32(d.value(), d.key(), &o.chunker.min_tokens);
        else if (d.key() == "chunk_max_tokens") s = u32(d.value(), d.key(), &o.chunker.max_tokens);
        else if (d.key() == "sink_tokens") s = u32(d.value(), d.key(), &o.sink_tokens);
        else if (d.key() == "budget_tokens") s = u32(d.value(), d.key(), &o.default_budget_tokens);
        else if (d.key() == "retrieval_block_tokens") s = u32(d.value(), d.key(), &o.retrieval.block_tokens);
        else if (d.key() == "retrieval_rule_value") {
          if (!d.value().is_number()) s = InvalidArgument("config: retrieval_rule_value must be a number");
          else o.retrieval.rule_value = d.value().get<float>();
        } else if (d.key() == "retrieval_rule") {
          const std::string r = d.value().is_string() ? d.value().get<std::string>() : "";
          if (r == "top_k") o.retrieval.rule = index::BlockRule::kTopK;
          else if (r == "ratio") o.retrieval.rule = index::BlockRule::kRatio;
          else if (r == "threshold") o.retrieval.rule = index::BlockRule::kThreshold;
          else if (r == "top_p") o.retrieval.rule = index::BlockRule::kTopP;
          else s = InvalidArgument("config: retrieval_rule must be top_k, ratio, threshold or top_p");
        } else if (d.key() == "retrieval_block_pooling") {
          const std::string r = d.value().is_string() ? d.value().get<std::string>() : "";
          if (r == "max") o.retrieval.pooling = kernels::BlockPool::kMax;
          else if (r == "mean") o.retrieval.pooling = kernels::BlockPool::kMean;
          else s = InvalidArgument("config: retrieval_block_pooling must be max or mean");
        }
        else if (d.key() == "search_aggregation") {
          // How a KV head's GQA group of queries scores a node (index mode).
          const std::string r = d.value().is_string() ? d.value().get<std::string>() : "";
          if (r == "mean_query") o.search.aggregation = index::GroupAggregation::kMeanQuery;
          else if (r == "max_bound") o.search.aggregation = index::GroupAggregation::kMaxBound;
          else s = InvalidArgument("config: search_aggregation must be mean_query or max_bound");
        } else if (d.key() == "search_traversal") {
          const std::string r = d.value().is_string() ? d.value().get<std::string>() : "";
          if (r == "best_first") o.search.traversal = index::BudgetTraversal::kBestFirst;
          else if (r == "levelwise") o.search.traversal = index::BudgetTraversal::kLevelwise;
          else s = InvalidArgument("config: search_traversal must be best_first or levelwise");
        } else if (d.key() == "search_node_radius_weight" ||
                   d.key() == "search_chunk_radius_weight") {
          if (!d.value().is_number() || !(d.value().get<double>() >= 0.0) ||
              !(d.value().get<double>() <= 1.0)) {
            s = InvalidArgument("config: " + d.key() + " must be a number in [0, 1]");
          } else if (d.key() == "search_node_radius_weight") {
            o.search.node_radius_weight = d.value().get<float>();
          } else {
            o.search.chunk_radius_weight = d.value().get<float>();
          }
        } else if (d.key() == "search_rescore_overfetch") {
          if (!d.value().is_number()) s = InvalidArgument("config: search_rescore_overfetch must be a number");
          else o.rescore_overfetch = d.value().get<float>();
        } else if (d.key() == "search_rescore_granularity") {
          const std::string r = d.value().is_string() ? d.value().get<std::string>() : "";
          if (r == "chunk") o.rescore_tokens = false;
          else if (r == "token") o.rescore_tokens = true;
          else s = InvalidArgument("config: search_rescore_granularity must be chunk or token");
        } else if (d.key() == "tree_levels") s = u32(d.value(), d.key(), &o.tree.levels);
        else if (d.key() == "tree_fine_cluster_chunks") s = u32(d.value(), d.key(), &o.tree.fine_cluster_chunks);
        else if (d.key() == "tree_min_chunks_to_cluster") s = u32(d.value(), d.key(), &o.tree.min_chunks_to_cluster);
        else s = InvalidArgument("config: unknown key session_defaults." + d.key());
      }
    } else {
      s = InvalidArgument("config: unknown key '" + k + "'");
    }
    KVMEM_RETURN_IF_ERROR(s.WithContext(path));
  }
  return Status::OK();
}

}  // namespace

}  // namespace kvmem
