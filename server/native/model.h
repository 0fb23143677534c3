// A served model version: its onnxruntime sessions, request validation and the dynamic batcher
// (a bounded queue drained by worker threads, one per session, which share a pool of sessions
// with the inline path: a cheap model's request runs on the submitting thread when nothing is
// queued and a session is free).
#pragma once

#include <grpcpp/grpcpp.h>
#include <onnxruntime_cxx_api.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "inference.grpc.pb.h"
#include "util.h"
#include "wire.h"

namespace bnn {

namespace pb = inference;
using grpc::Status;
using grpc::StatusCode;

struct DType {
  const char* v2;    // KServe V2 datatype name
  pb::DataType cfg;  // Triton model config enum
  size_t size;       // bytes an element
  ONNXTensorElementDataType ort;
};

struct TensorSpec {
  std::string name;
  DType dt;
  std::vector<int64_t> shape;  // batch axis as -1
};

// A Prometheus histogram (non-cumulative bucket counts; cumulated when rendered).
struct Hist {
  const std::vector<double>* bounds = nullptr;
  std::vector<uint64_t> counts;  // bounds->size() + 1 (the last is +Inf)
  double sum = 0;
  uint64_t count = 0;
  void init(const std::vector<double>* b) {
    bounds = b;
    counts.assign(b->size() + 1, 0);
  }
  void observe(double v);
};

constexpr int kCodes = 17;  // gRPC status codes 0..16

// Counters of one model version (or of "<unknown>" models), guarded by mu. Feeds both
// ModelStatistics and /metrics. No allocation when counting.
struct VersionStats {
  std::string model, version;
  std::mutex mu;
  uint64_t success = 0, failure[kCodes] = {}, inference_count = 0, execution_count = 0;
  Hist batch_size, batch_requests, queue_s, compute_s, request_s;
  uint64_t last_ms = 0, success_ns = 0, fail_count = 0, fail_ns = 0;
  uint64_t queue_ns = 0, cin_ns = 0, cinfer_ns = 0, cout_ns = 0;
  std::atomic<int64_t> queue_depth{0};
  void init(const std::vector<double>* latency, const std::vector<double>* sizes) {
    batch_size.init(sizes);
    batch_requests.init(sizes);
    queue_s.init(latency);
    compute_s.init(latency);
    request_s.init(latency);
  }
};

class ModelVersion;

// One request (a unary call or one message of a stream) from validation to its answer.
struct Pending {
  virtual ~Pending() = default;
  const pb::ModelInferRequest* req = nullptr;
  pb::ModelInferResponse* resp = nullptr;
  grpc::ServerContextBase* ctx = nullptr;  // its call's: deadline, IsCancelled
  ModelVersion* mv = nullptr;  // null until resolved
  int64_t t_start = 0, t_enq = 0;
  int64_t rows = 0;
  size_t in_bytes = 0;
  bool has_deadline = false, dequeued = false;
  std::chrono::system_clock::time_point deadline;
  std::vector<int> slot;  // model input k -> request input index
  std::vector<int> want;  // requested outputs (model output indices)
  RawInputs raw;  // req's raw_input_contents entries (req itself has none when scanned)
  // Request input i's typed contents narrowed to its tensor's type (INT8, INT16, UINT8 and UINT16
  // travel as 32-bit values), else empty: the bytes onnxruntime reads for it.
  std::vector<std::string> narrowed;
  int64_t queue_ns = 0, cin_ns = 0, cinfer_ns = 0, cout_ns = 0;  // set for a run request
  // Called exactly once with the outcome (from a worker, or from the handler on an early error).
  virtual void done(const Status& st) = 0;
};

struct VersionPlan {
  std::string name, version, path;
  int instances = 1;
  int64_t max_batch_size = 0, max_queue_size = 1024, max_combined = 0, delay_us = 0;
  std::vector<int64_t> preferred;
};

class ModelVersion {
 public:
  ModelVersion(Ort::Env& env, const VersionPlan& plan, const std::vector<double>* latency,
               const std::vector<double>* sizes);
  ~ModelVersion();

  const std::string& name() const { return plan_.name; }
  const std::string& version() const { return plan_.version; }
  VersionStats& stats() { return stats_; }
  pb::ModelMetadataResponse metadata;
  pb::ModelConfigResponse config;

  // Validates p->req (messages as the prototype's) and fills p's slot/want/rows/in_bytes.
  Status validate(Pending* p) const;
  // Queues a validated request, or runs it at once on the calling thread (answering it before
  // returning) when the model is cheap (its compute EWMA below kInlineNs), nothing is queued and
  // a session is free. UNAVAILABLE when the queue is full, DEADLINE_EXCEEDED when its deadline
  // already passed. On error p is not queued (the caller answers it); on OK p may be gone.
  Status enqueue(Pending* p);

  void start();
  // Fails every queued request at once with `st` (a drain whose grace ran out).
  void abort_queued(const Status& st);
  void stop();  // workers finish what is queued, then exit; joins them

 private:
  // A session and its merge buffers. Taken from free_ (under mu_) for one batch at a time, by a
  // worker or by the inline path: never two runs on one session at once.
  struct Slot {
    std::unique_ptr<Ort::Session> session;
    std::vector<std::vector<char>> bufs;  // concatenation buffers, reused
  };
  void worker();
  // Returns a slot to the pool after a batch that took `ns` (updates the EWMA). Under mu_.
  void release_locked(Slot* slot, int64_t ns);
  // Runs a batch and answers every request of it; never throws. Returns its compute time (ns).
  int64_t run_batch(Slot& slot, std::vector<Pending*>& batch);
  // run_batch's work: merge, run, split into the responses. May throw; *t1/*t2 are set when
  // the run starts/ends.
  Status compute(Slot& slot, std::vector<Pending*>& batch, int64_t total_rows,
                 size_t total_bytes, int64_t* t1, int64_t* t2);
  bool compatible(const Pending* a, const Pending* b) const;

  VersionPlan plan_;
  std::vector<Slot> slots_;  // one per instance; fixed after construction
  Ort::RunOptions plain_, shrink_;
  std::vector<TensorSpec> inputs_, outputs_;
  std::vector<const char*> in_names_, out_names_;
  std::string names_;
  int64_t combine_target_ = 0;  // rows worth waiting for (max_queue_delay_us > 0)

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Pending*> queue_;
  int64_t queued_rows_ = 0;
  std::vector<Slot*> free_;  // sessions not running a batch
  // Batches running (workers and inline): every slot not in free_. Under mu_.
  size_t running_locked() const { return slots_.size() - free_.size(); }
  int64_t ewma_ns_ = -1;     // EWMA of a batch's compute time; -1 before the first run
  bool stopping_ = false;
  std::vector<std::thread> threads_;
  VersionStats stats_;
};

}  // namespace bnn
