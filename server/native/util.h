// Small helpers of bnserve_native: clocks, logging, base64, Prometheus text escaping.
#pragma once

#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <string>

namespace bnn {

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline uint64_t wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

enum LogLevel { kDebug = 10, kInfo = 20, kWarning = 30, kError = 40 };
extern int g_log_level;

// One line on stderr, prefixed "bnserve-native: ".
void logf(int level, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

// Hand-written base64 decoder (standard alphabet, '=' padding, whitespace ignored); no packaged
// library is used. Returns false on a character outside the alphabet or a bad length.
bool base64_decode(const std::string& in, std::string* out);

// A Prometheus label value with \\, \" and \n escaped.
std::string prom_escape(const std::string& s);

}  // namespace bnn
