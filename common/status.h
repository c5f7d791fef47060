// Status and Result<T>: the one error convention at module boundaries.
//
// A Status is OK or carries a code and a message. Codes mirror the wire enum
// kvmem.wire.Code (schemas/kvmem.fbs) value for value, so the daemon translates with a cast
// and a client sees the code the daemon chose. Values are never reused.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

namespace kvmem {

enum class StatusCode : uint16_t {
  kOk = 0,
  kCancelled = 1,
  kUnknown = 2,
  kInvalidArgument = 3,
  kDeadlineExceeded = 4,
  kNotFound = 5,
  kAlreadyExists = 6,
  kPermissionDenied = 7,
  kResourceExhausted = 8,
  kFailedPrecondition = 9,
  kAborted = 10,
  kOutOfRange = 11,
  kUnimplemented = 12,
  kInternal = 13,
  kUnavailable = 14,
  kDataLoss = 15,
  kUnauthenticated = 16,
  kInProgress = 17,  // Started, not finished: poll or wait for completion.
};

// "INVALID_ARGUMENT" etc.; stable, used in logs, metrics labels and kvmemctl output.
std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message) : code_(code) {
    if (code != StatusCode::kOk) message_ = std::move(message);
  }

  static Status OK() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // "NOT_FOUND: session 7 does not exist" or "OK".
  std::string ToString() const;

  // Prepends context: "append: " + message. No-op on OK.
  Status WithContext(std::string_view context) const;

  void IgnoreError() const {}

  friend bool operator==(const Status& a, const Status& b) {
    return a.code_ == b.code_ && a.message_ == b.message_;
  }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

Status InvalidArgument(std::string message);
Status NotFound(std::string message);
Status AlreadyExists(std::string message);
Status PermissionDenied(std::string message);
Status Unauthenticated(std::string message);
Status ResourceExhausted(std::string message);
Status FailedPrecondition(std::string message);
Status OutOfRange(std::string message);
Status Unimplemented(std::string message);
Status Internal(std::string message);
Status Unavailable(std::string message);
Status DataLoss(std::string message);
Status Aborted(std::string message);
Status Cancelled(std::string message);
Status DeadlineExceeded(std::string message);

// Result<T>: a T or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT(google-explicit-constructor)
  Result(Status status) : v_(std::move(status)) {  // NOLINT(google-explicit-constructor)
    if (std::get<Status>(v_).ok()) v_ = Status(StatusCode::kInternal, "Result built from OK status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }

  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }

  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::variant<T, Status> v_;
};

namespace detail {
inline const Status& AsStatus(const Status& s) { return s; }
template <typename T>
const Status& AsStatus(const Result<T>& r) {
  return r.status();
}
}  // namespace detail

}  // namespace kvmem

#define KVMEM_CONCAT_INNER(a, b) a##b
#define KVMEM_CONCAT(a, b) KVMEM_CONCAT_INNER(a, b)

// Returns the Status of `expr` (a Status or a Result<T>) from the enclosing function if not OK.
#define KVMEM_RETURN_IF_ERROR(expr)                                          \
  do {                                                                       \
    ::kvmem::Status _kvmem_st = ::kvmem::detail::AsStatus(expr);             \
    if (!_kvmem_st.ok()) return _kvmem_st;                                   \
  } while (0)

// KVMEM_ASSIGN_OR_RETURN(auto x, MakeX()); declares/assigns x or returns the error.
#define KVMEM_ASSIGN_OR_RETURN(lhs, rexpr) \
  KVMEM_ASSIGN_OR_RETURN_IMPL(KVMEM_CONCAT(_kvmem_result_, __LINE__), lhs, rexpr)
#define KVMEM_ASSIGN_OR_RETURN_IMPL(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                                \
  if (!tmp.ok()) return tmp.status();                \
  lhs = std::move(tmp).value()
