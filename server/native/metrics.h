// The Prometheus text-format endpoint (GET /metrics), hand-written: Debian bookworm packages no
// prometheus-cpp. One thread, one connection at a time, 5 s socket timeouts.
#pragma once

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "model.h"

namespace bnn {

class MetricsServer {
 public:
  MetricsServer(const std::vector<ModelVersion*>* versions, VersionStats* unknown,
                const std::atomic<int64_t>* inflight, const std::atomic<bool>* accepting)
      : versions_(versions), unknown_(unknown), inflight_(inflight), accepting_(accepting) {}
  ~MetricsServer() { stop(); }
  // Binds host:port (0 = ephemeral) and starts the thread; returns the bound port, or -1 with *err.
  int start(const std::string& host, int port, std::string* err);
  void stop();
  std::string render() const;  // the exposition text

 private:
  void loop();
  void serve(int fd);

  const std::vector<ModelVersion*>* versions_;
  VersionStats* unknown_;
  const std::atomic<int64_t>* inflight_;
  const std::atomic<bool>* accepting_;
  int fd_ = -1;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace bnn
