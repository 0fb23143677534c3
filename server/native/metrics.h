// The Prometheus text-format endpoint (GET /metrics), hand-written: Debian bookworm packages no
// prometheus-cpp. One thread, one connection at a time, 2 s in all for each connection.
#pragma once

#include <atomic>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "model.h"

namespace bnn {

class MetricsServer {
 public:
  // unknown: counters of requests that named no served version (rendered once used).
  MetricsServer(const std::vector<ModelVersion*>* versions,
                const std::vector<VersionStats*>* unknown, const std::atomic<int64_t>* inflight,
                const std::atomic<bool>* accepting)
      : versions_(versions), unknown_(unknown), inflight_(inflight), accepting_(accepting) {}
  ~MetricsServer() { stop(); }
  // Binds host:port (0 = ephemeral) and starts the thread; returns the bound port, or -1 with *err.
  int start(const std::string& host, int port, std::string* err);
  void stop();
  std::string render() const;  // the exposition text

 private:
  void loop();
  void serve(int fd, int64_t deadline_ns);

  const std::vector<ModelVersion*>* versions_;
  const std::vector<VersionStats*>* unknown_;
  const std::atomic<int64_t>* inflight_;
  const std::atomic<bool>* accepting_;
  int fd_ = -1;
  std::atomic<bool> stop_{false};
  std::mutex conn_mu_;
  int conn_ = -1;  // the connection being served (stop() shuts it down), under conn_mu_
  std::thread thread_;
};

}  // namespace bnn
