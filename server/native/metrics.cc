#include "metrics.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace bnn {

namespace {

constexpr int64_t kConnectionBudgetNs = 2000000000;  // reading the request and writing the answer

const char* kCodeNames[kCodes] = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED"};

// A float as Python's repr would print it (what prometheus_client writes): shortest round trip,
// integral values with ".0".
std::string num(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  char buf[64];
  if (v == std::floor(v) && std::fabs(v) < 1e16) {
    std::snprintf(buf, sizeof buf, "%.1f", v);
    return buf;
  }
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

void header(std::string& o, const char* name, const char* type, const char* help) {
  o += "# HELP ";
  o += name;
  o += ' ';
  o += help;
  o += "\n# TYPE ";
  o += name;
  o += ' ';
  o += type;
  o += '\n';
}

void hist(std::string& o, const char* name, const std::string& labels, const Hist& h) {
  uint64_t cum = 0;
  for (size_t i = 0; i <= h.bounds->size(); ++i) {
    cum += h.counts[i];
    o += name;
    o += "_bucket{" + labels + ",le=\"" + (i < h.bounds->size() ? num((*h.bounds)[i]) : "+Inf") +
         "\"} " + num(double(cum)) + "\n";
  }
  o += std::string(name) + "_count{" + labels + "} " + num(double(h.count)) + "\n";
  o += std::string(name) + "_sum{" + labels + "} " + num(h.sum) + "\n";
}

// A copy of one version's counters, taken under its lock.
struct Snap {
  std::string labels;
  bool known;
  uint64_t success, failure[kCodes], inference_count, execution_count;
  Hist batch_size, batch_requests, queue_s, compute_s, request_s;
  int64_t depth;
};

}  // namespace

std::string MetricsServer::render() const {
  std::vector<Snap> snaps;
  auto take = [&](VersionStats& s, bool known) {
    Snap x;
    x.labels = "model=\"" + prom_escape(s.model) + "\",version=\"" + prom_escape(s.version) + "\"";
    x.known = known;
    std::lock_guard<std::mutex> g(s.mu);
    x.success = s.success;
    std::memcpy(x.failure, s.failure, sizeof x.failure);
    x.inference_count = s.inference_count;
    x.execution_count = s.execution_count;
    x.batch_size = s.batch_size;
    x.batch_requests = s.batch_requests;
    x.queue_s = s.queue_s;
    x.compute_s = s.compute_s;
    x.request_s = s.request_s;
    x.depth = s.queue_depth.load();
    snaps.push_back(std::move(x));
  };
  for (ModelVersion* mv : *versions_) take(mv->stats(), true);
  for (VersionStats* u : *unknown_) {
    take(*u, false);
    bool used = snaps.back().success || snaps.back().request_s.count;
    for (uint64_t c : snaps.back().failure) used = used || c;
    if (!used) snaps.pop_back();
  }

  std::string o;
  o.reserve(16384);
  header(o, "bnserve_request_success_total", "counter", "Requests answered OK.");
  for (auto& s : snaps) o += "bnserve_request_success_total{" + s.labels + "} " + num(double(s.success)) + "\n";
  header(o, "bnserve_request_failure_total", "counter", "Requests answered with an error, by gRPC status code.");
  for (auto& s : snaps)
    for (int c = 1; c < kCodes; ++c)
      if (s.failure[c])
        o += "bnserve_request_failure_total{" + s.labels + ",code=\"" + kCodeNames[c] + "\"} " +
             num(double(s.failure[c])) + "\n";
  header(o, "bnserve_inference_count_total", "counter", "Rows inferred.");
  for (auto& s : snaps)
    if (s.known) o += "bnserve_inference_count_total{" + s.labels + "} " + num(double(s.inference_count)) + "\n";
  header(o, "bnserve_execution_count_total", "counter", "onnxruntime runs (batches).");
  for (auto& s : snaps)
    if (s.known) o += "bnserve_execution_count_total{" + s.labels + "} " + num(double(s.execution_count)) + "\n";
  header(o, "bnserve_batch_size", "histogram", "Rows per onnxruntime run.");
  for (auto& s : snaps)
    if (s.known) hist(o, "bnserve_batch_size", s.labels, s.batch_size);
  header(o, "bnserve_batch_requests", "histogram", "Requests merged per onnxruntime run.");
  for (auto& s : snaps)
    if (s.known) hist(o, "bnserve_batch_requests", s.labels, s.batch_requests);
  header(o, "bnserve_queue_duration_seconds", "histogram", "Seconds a request waited in the queue.");
  for (auto& s : snaps)
    if (s.known) hist(o, "bnserve_queue_duration_seconds", s.labels, s.queue_s);
  header(o, "bnserve_compute_duration_seconds", "histogram", "Seconds per onnxruntime run (with concatenate/split).");
  for (auto& s : snaps)
    if (s.known) hist(o, "bnserve_compute_duration_seconds", s.labels, s.compute_s);
  header(o, "bnserve_request_duration_seconds", "histogram", "Seconds per request, end to end in the server.");
  for (auto& s : snaps) hist(o, "bnserve_request_duration_seconds", s.labels, s.request_s);
  header(o, "bnserve_inflight_requests", "gauge", "Requests in flight.");
  o += "bnserve_inflight_requests " + num(double(std::max<int64_t>(0, inflight_->load()))) + "\n";
  header(o, "bnserve_queue_depth", "gauge", "Requests queued, not yet batched.");
  for (auto& s : snaps)
    if (s.known) o += "bnserve_queue_depth{" + s.labels + "} " + num(double(s.depth)) + "\n";
  header(o, "bnserve_model_ready", "gauge", "1 if the model version takes requests.");
  const bool ready = accepting_->load();
  for (auto& s : snaps)
    if (s.known) o += "bnserve_model_ready{" + s.labels + "} " + (ready ? "1.0" : "0.0") + "\n";
  return o;
}

int MetricsServer::start(const std::string& host, int port, std::string* err) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  std::string h = host;
  if (h.size() > 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  int rc = getaddrinfo(h.empty() ? nullptr : h.c_str(), std::to_string(port).c_str(), &hints, &res);
  if (rc != 0) {
    *err = gai_strerror(rc);
    return -1;
  }
  int fd = socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, res->ai_protocol);
  int one = 1;
  if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 16) != 0) {
    *err = std::strerror(errno);
    if (fd >= 0) close(fd);
    freeaddrinfo(res);
    return -1;
  }
  freeaddrinfo(res);
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
  int bound = ss.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                                       : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  fd_ = fd;
  thread_ = std::thread([this] { loop(); });
  return bound;
}

void MetricsServer::stop() {
  stop_.store(true);
  {
    std::lock_guard<std::mutex> g(conn_mu_);
    if (conn_ >= 0) shutdown(conn_, SHUT_RDWR);  // a stalled client does not hold the exit
  }
  if (thread_.joinable()) thread_.join();
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

void MetricsServer::loop() {
  while (!stop_.load()) {
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, 200) <= 0) continue;
    int c = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (c < 0) continue;
    bool go;
    {
      std::lock_guard<std::mutex> g(conn_mu_);
      conn_ = c;
      go = !stop_.load();
    }
    if (go) serve(c, now_ns() + kConnectionBudgetNs);
    {
      std::lock_guard<std::mutex> g(conn_mu_);
      conn_ = -1;
    }
    close(c);
  }
}

void MetricsServer::serve(int fd, int64_t deadline_ns) {
  // Waits (within the connection's deadline) until fd is ready for `events`.
  auto ready = [&](short events) {
    for (;;) {
      const int64_t left_ms = (deadline_ns - now_ns()) / 1000000;
      if (left_ms <= 0) return false;
      pollfd p{fd, events, 0};
      int rc = poll(&p, 1, int(left_ms));
      if (rc > 0) return true;
      if (rc < 0 && errno != EINTR) return false;
    }
  };
  std::string req;
  char buf[2048];
  while (req.find("\r\n\r\n") == std::string::npos && req.find("\n\n") == std::string::npos) {
    if (req.size() > 16384 || !ready(POLLIN)) return;
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue;
    if (n <= 0) return;
    req.append(buf, size_t(n));
  }
  std::string line = req.substr(0, req.find_first_of("\r\n"));
  std::string method = line.substr(0, line.find(' '));
  std::string path;
  if (line.find(' ') != std::string::npos) {
    path = line.substr(line.find(' ') + 1);
    path = path.substr(0, path.find(' '));
    path = path.substr(0, path.find('?'));
  }
  std::string status = "200 OK", type = "text/plain; version=0.0.4; charset=utf-8", body;
  if (method != "GET" && method != "HEAD") {
    status = "405 Method Not Allowed";
    type = "text/plain; charset=utf-8";
    body = "method not allowed\n";
  } else if (path != "/metrics" && path != "/") {
    status = "404 Not Found";
    type = "text/plain; charset=utf-8";
    body = "not found; try /metrics\n";
  } else {
    body = render();
  }
  std::string out = "HTTP/1.1 " + status + "\r\nContent-Type: " + type +
                    "\r\nContent-Length: " + std::to_string(body.size()) +
                    "\r\nConnection: close\r\n\r\n";
  if (method != "HEAD") out += body;
  size_t off = 0;
  while (off < out.size()) {
    if (!ready(POLLOUT)) return;
    ssize_t n = send(fd, out.data() + off, out.size() - off, MSG_NOSIGNAL);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue;
    if (n <= 0) return;
    off += size_t(n);
  }
}

}  // namespace bnn
