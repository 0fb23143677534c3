// bnserve_native: bnserve's native data plane (`bnserve serve --frontend native`).
//
// Python loads settings, scans the repository, runs the frozen-model and batch-invariance gates,
// writes a JSON plan and execs `bnserve_native --plan PLAN.json`. This binary then serves the
// KServe V2 / Open Inference Protocol over gRPC (proto/inference.proto) with gRPC's async API:
// one completion queue and one thread (bnn-grpc) for every 4 cores see each call arrive,
// validate and queue its request; the model version's worker threads (one per onnxruntime
// session, model.cc) batch compatible requests, run them and finish the calls. A cheap model's
// request (batches under 500 us) with nothing queued and a session free runs inline instead, on
// the queue's thread, and is answered there. ModelStreamInfer handles each message before
// reading the next (a queued one costs only its submit), holds at most kStreamWindow unwritten
// per stream and writes responses in completion order.
// Every method is registered raw (grpc::ByteBuffer in and out, parsed and serialized here; see
// parse_request) so undecodable request bytes get INVALID_ARGUMENT, as on the Python front end.
// Also: grpc.health.v1 Health (our own, health.proto), server reflection, Prometheus text
// metrics (metrics.cc), graceful drain on SIGTERM/SIGINT.

#include <absl/synchronization/mutex.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpc/support/log.h>
#include <google/protobuf/stubs/logging.h>
#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include <cctype>
#include <cstring>
#include <cstdio>
#include <fstream>
#include <map>
#include <pthread.h>
#include <sched.h>
#include <set>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "health.grpc.pb.h"
#include "metrics.h"
#include "model.h"
#include "util.h"

namespace bnn {
namespace {

constexpr int kStreamWindow = 1024;  // messages of one stream read and not yet answered
const char* kShuttingDown = "server is shutting down; retry on another replica";

const char* code_name(StatusCode c) {
  static const char* names[kCodes] = {
      "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
      "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
      "UNAUTHENTICATED"};
  int i = int(c);
  return i >= 0 && i < kCodes ? names[i] : "UNKNOWN";
}

struct Model {
  std::string name, default_version, versions_list;
  std::map<std::string, std::unique_ptr<ModelVersion>> versions;
  // Requests naming a version this model does not serve: one series (version "<unknown>"),
  // so a client cannot grow the metric series with made-up versions.
  std::unique_ptr<VersionStats> unknown_version;
};

class StreamCall;

class Core {
 public:
  std::map<std::string, Model> models;
  std::vector<ModelVersion*> all;  // every served version, in plan order
  pb::ServerMetadataResponse server_metadata;
  VersionStats unknown;  // requests naming no known model (or not parsed)
  std::vector<VersionStats*> unknown_all;  // `unknown`, then each model's unknown_version
  std::atomic<bool> accepting{true};
  // Accepted requests not yet answered (the bnserve_inflight_requests gauge): counted once
  // accepted, uncounted just before the answer is handed to gRPC. Refused calls never count.
  std::atomic<int64_t> inflight{0};
  std::mutex drain_mu;
  std::condition_variable drain_cv;
  // Live ModelStreamInfer calls (see StreamCall), so the drain can end idle streams.
  std::mutex streams_mu;
  std::set<StreamCall*> streams;
  bool streams_closing = false;  // under streams_mu: new streams are ended at once

  // now_ns() of the last call the drain refused (UNAVAILABLE): the port closes only once they
  // have stopped (see main).
  std::atomic<int64_t> last_refusal_ns{0};

  bool enter() {
    if (!accepting.load()) return refused();
    inflight.fetch_add(1);
    if (!accepting.load()) {  // the drain began in between: undo (it may be waiting on us)
      leave();
      return refused();
    }
    return true;
  }
  bool refused() {
    last_refusal_ns.store(now_ns());
    return false;
  }
  void leave() {
    if (inflight.fetch_sub(1) == 1 && !accepting.load()) {
      std::lock_guard<std::mutex> g(drain_mu);
      drain_cv.notify_all();
    }
  }

  ModelVersion* find(const std::string& name, const std::string& version, Status* st) {
    auto it = models.find(name);
    if (it == models.end()) {
      std::string avail;
      for (auto& kv : models) avail += (avail.empty() ? "" : ", ") + kv.first;
      *st = Status(StatusCode::NOT_FOUND, "unknown model '" + name + "'; available models: " +
                                              (avail.empty() ? "none" : avail));
      return nullptr;
    }
    Model& m = it->second;
    auto v = m.versions.find(version.empty() ? m.default_version : version);
    if (v == m.versions.end()) {
      *st = Status(StatusCode::NOT_FOUND, "model '" + name + "' has no version '" + version +
                                              "'; versions: " + m.versions_list);
      return nullptr;
    }
    return v->second.get();
  }
  ModelVersion* find_quiet(const pb::ModelInferRequest& r) {
    Status st;
    return find(r.model_name(), r.model_version(), &st);
  }

  // Where a request that named no served version is counted: its model's "<unknown>" version
  // when the model is known, else the "<unknown>" model.
  VersionStats& unknown_for(const Pending* p) {
    if (p->req != nullptr) {
      auto it = models.find(p->req->model_name());
      if (it != models.end()) return *it->second.unknown_version;
    }
    return unknown;
  }

  // Counts one request's outcome, once (ModelStatistics and /metrics).
  void account(const Pending* p, StatusCode code) {
    const int64_t dur = now_ns() - p->t_start;
    VersionStats& s = p->mv ? p->mv->stats() : unknown_for(p);
    std::lock_guard<std::mutex> g(s.mu);
    s.request_s.observe(double(dur) * 1e-9);
    if (p->dequeued) s.queue_s.observe(double(p->queue_ns) * 1e-9);
    if (code == StatusCode::OK) {
      s.success++;
      s.success_ns += dur;
      s.queue_ns += p->queue_ns;
      s.cin_ns += p->cin_ns;
      s.cinfer_ns += p->cinfer_ns;
      s.cout_ns += p->cout_ns;
    } else {
      s.failure[int(code) < kCodes ? int(code) : 2]++;
      s.fail_count++;
      s.fail_ns += dur;
    }
  }

  // Resolves, validates and queues p. On error p was not queued: the caller calls p->done(st).
  Status submit(Pending* p) {
    Status st;
    ModelVersion* mv = find(p->req->model_name(), p->req->model_version(), &st);
    if (!mv) return st;
    p->mv = mv;
    st = mv->validate(p);
    if (!st.ok()) return st;
    return mv->enqueue(p);
  }

  void fill_stats(ModelVersion* mv, pb::ModelStatistics* m) {
    VersionStats& s = mv->stats();
    std::lock_guard<std::mutex> g(s.mu);
    m->set_name(mv->name());
    m->set_version(mv->version());
    m->set_last_inference(s.last_ms);
    m->set_inference_count(s.inference_count);
    m->set_execution_count(s.execution_count);
    auto* is = m->mutable_inference_stats();
    auto set = [](pb::StatisticDuration* d, uint64_t c, uint64_t ns) {
      d->set_count(c);
      d->set_ns(ns);
    };
    set(is->mutable_success(), s.success, s.success_ns);
    set(is->mutable_fail(), s.fail_count, s.fail_ns);
    set(is->mutable_queue(), s.success, s.queue_ns);
    set(is->mutable_compute_input(), s.success, s.cin_ns);
    set(is->mutable_compute_infer(), s.success, s.cinfer_ns);
    set(is->mutable_compute_output(), s.success, s.cout_ns);
  }
};

Core* g_core = nullptr;

// ---------------------------------------------------------------------------------------------
// Request parsing and response serialization. gRPC C++'s typed handlers answer request bytes
// that do not parse with UNIMPLEMENTED and an empty message; so every method is registered raw
// and parses here: INVALID_ARGUMENT, saying what was expected (the Python front
// end's wording, server/servicer.py Undecodable).

// INVALID_ARGUMENT for n bytes that are not a `type` message.
Status undecodable(size_t n, const std::string& type) {
  return Status(StatusCode::INVALID_ARGUMENT,
                "request is not a valid " + type + " protobuf message: its " + std::to_string(n) +
                    " byte(s) do not parse as one (corrupt or truncated wire format, or a string "
                    "field that is not UTF-8); expected a serialized " + type);
}

// Parses *in into *msg. gRPC owns *in (allocated for this call, never read again by gRPC): the
// parse reads its slices in place (protobuf copies bytes fields out of them) and then releases
// them (Clear). On failure *msg is cleared (no half-parsed id or model name leaks into the
// answer).
template <class M>
Status parse_request(const grpc::ByteBuffer* in, M* msg) {
  auto* bb = const_cast<grpc::ByteBuffer*>(in);
  if (bb != nullptr && bb->Valid()) {
    const size_t n = bb->Length();
    if (grpc::SerializationTraits<M>::Deserialize(bb, msg).ok()) return Status::OK;
    msg->Clear();
    return undecodable(n, msg->GetTypeName());
  }
  msg->Clear();
  return Status(StatusCode::INVALID_ARGUMENT, "request is not a valid " + msg->GetTypeName() +
                                                  " protobuf message: no request message was sent");
}

// A ModelInferRequest into p's message and p->raw: scanned without copying its tensors
// (wire.h), else parsed by protobuf as a whole (raw then points at the message's own entries).
Status parse_infer_request(grpc::ByteBuffer* in, Pending* p, pb::ModelInferRequest* msg) {
  switch (scan_infer_request(*in, msg, &p->raw)) {
    case Scan::kParsed:
      in->Clear();  // p->raw holds the slices it still needs (none once own()ed)
      return Status::OK;
    case Scan::kInvalid:  // as protobuf would answer for the whole
      p->raw.clear();
      msg->Clear();
      return undecodable(in->Length(), msg->GetTypeName());
    case Scan::kNotPlain: break;
  }
  p->raw.clear();
  Status st = parse_request(in, msg);
  if (st.ok())
    for (const std::string& s : msg->raw_input_contents()) p->raw.entries.emplace_back().add(s);
  return st;
}

// Serializes msg into *out (what gRPC's typed handlers do when they send a response).
template <class M>
Status serialize_response(const M& msg, grpc::ByteBuffer* out) {
  bool own = true;
  Status st = grpc::SerializationTraits<M>::Serialize(msg, out, &own);
  if (st.ok()) return st;
  return Status(StatusCode::RESOURCE_EXHAUSTED,
                "the " + msg.GetTypeName() + " response cannot be serialized (" +
                    std::to_string(msg.ByteSizeLong()) + " bytes; at most 2 GiB): ask for fewer "
                    "rows or outputs");
}

// ---------------------------------------------------------------------------------------------
// The RPC layer: gRPC C++'s async API. Every method is registered raw and asynchronous; calls
// arrive on a completion queue drained by one thread (bnn-grpc; one queue and thread per 4
// cores), where a stream's operations also complete; a unary call's own completions go to that
// thread's quiet queue (QuietQueue).
//
// Why not the callback API (used up to round 7): in gRPC 1.51 a server with any callback method
// gets two "nexting" threads that take turns at the process's one epoll poller and hand it over
// for every event: about 5 wake-ups of theirs a vol3d request, 2.4 of them preempting an
// onnxruntime worker (perf sched). One thread on one queue polls, reads and answers without
// that hand-off: digits at 16 in flight 0.038 vs 0.055 ms of server CPU a request, vol3d's
// gRPC share 0.104 vs 0.118 ms (docs/performance-notes.md, round 8). For the same reason the
// health service is ours (HealthService, a sync service like reflection's; gRPC's default one is
// built on the callback API).
//
// Deadlines and cancellation: ModelInfer and ModelStreamInfer calls ask for their "done"
// completion (AsyncNotifyWhenDone), which is what makes ServerContext::IsCancelled valid for a
// request still queued (model.cc drops those); a call object is deleted on the last of its
// completions.

using gis = pb::GRPCInferenceService;
using AsyncService = gis::WithRawMethod_ServerLive<gis::WithRawMethod_ServerReady<
    gis::WithRawMethod_ModelReady<gis::WithRawMethod_ServerMetadata<
        gis::WithRawMethod_ModelMetadata<gis::WithRawMethod_ModelInfer<
            gis::WithRawMethod_ModelStreamInfer<gis::WithRawMethod_ModelConfig<
                gis::WithRawMethod_ModelStatistics<gis::WithRawMethod_RepositoryIndex<
                    gis::WithRawMethod_RepositoryModelLoad<
                        gis::WithRawMethod_RepositoryModelUnload<gis::Service>>>>>>>>>>>>;

// What the completion queue hands back: one pending operation of a call.
struct Tag {
  virtual void proceed(bool ok) = 0;

 protected:
  ~Tag() = default;
};

// A call's second (third...) tag: forwards the completion to one of its owner's methods.
template <class T, void (T::*F)(bool)>
struct Hop final : Tag {
  T* owner;
  explicit Hop(T* o) : owner(o) {}
  void proceed(bool ok) override { (owner->*F)(ok); }
};

// Where a unary call's own operations complete (its answer sent, the call done): a completion
// queue without a pollset, so a worker's Finish posts there without waking anyone (on the
// server's queue it woke the queue's thread 1.7 times a vol3d request, mostly preempting the
// other worker: round 8). The queue's thread drains it every kQuietDrainMs while a unary call is
// open: until then an answered call keeps its memory.
class QuietQueue final : public grpc::CompletionQueue {
 public:
  QuietQueue()
      : grpc::CompletionQueue(grpc_completion_queue_attributes{
            GRPC_CQ_CURRENT_VERSION, GRPC_CQ_NEXT, GRPC_CQ_NON_POLLING, nullptr}) {}
};
constexpr int kQuietDrainMs = 5;

// A completion queue of the server and its thread's state. Calls arrive on `cq`; a stream's
// operations complete there too, a unary call's on `quiet`.
struct Queue {
  std::unique_ptr<grpc::ServerCompletionQueue> cq;
  QuietQueue quiet;
  int open = 0;  // unary calls arrived whose completions on `quiet` are not all in (its thread only)
};

struct Rpc {
  AsyncService service;
  std::vector<std::unique_ptr<Queue>> queues;
};
Rpc* g_rpc = nullptr;

// ---------------------------------------------------------------------------------------------
// The metadata, statistics and repository methods: answered on the queue's thread.

bool draining() { return !g_core->accepting.load(); }
Status shutting_down() {
  g_core->refused();
  return Status(StatusCode::UNAVAILABLE, kShuttingDown);
}

Status do_ServerLive(const pb::ServerLiveRequest&, pb::ServerLiveResponse* o) {
  o->set_live(true);
  return Status::OK;
}
Status do_ServerReady(const pb::ServerReadyRequest&, pb::ServerReadyResponse* o) {
  o->set_ready(!draining() && !g_core->all.empty());
  return Status::OK;
}
Status do_ModelReady(const pb::ModelReadyRequest& r, pb::ModelReadyResponse* o) {
  Status st;
  o->set_ready(!draining() && g_core->find(r.name(), r.version(), &st) != nullptr);
  return Status::OK;
}
Status do_ServerMetadata(const pb::ServerMetadataRequest&, pb::ServerMetadataResponse* o) {
  if (draining()) return shutting_down();
  *o = g_core->server_metadata;
  return Status::OK;
}
Status do_ModelMetadata(const pb::ModelMetadataRequest& r, pb::ModelMetadataResponse* o) {
  if (draining()) return shutting_down();
  Status st;
  ModelVersion* mv = g_core->find(r.name(), r.version(), &st);
  if (!mv) return st;
  *o = mv->metadata;
  return Status::OK;
}
Status do_ModelConfig(const pb::ModelConfigRequest& r, pb::ModelConfigResponse* o) {
  if (draining()) return shutting_down();
  Status st;
  ModelVersion* mv = g_core->find(r.name(), r.version(), &st);
  if (!mv) return st;
  *o = mv->config;
  return Status::OK;
}
Status do_ModelStatistics(const pb::ModelStatisticsRequest& r, pb::ModelStatisticsResponse* o) {
  if (draining()) return shutting_down();
  if (r.name().empty()) {
    for (ModelVersion* mv : g_core->all) g_core->fill_stats(mv, o->add_model_stats());
    return Status::OK;
  }
  Status st;
  ModelVersion* mv = g_core->find(r.name(), r.version(), &st);
  if (!mv) return st;
  if (!r.version().empty()) {
    g_core->fill_stats(mv, o->add_model_stats());
  } else {
    for (auto& kv : g_core->models[r.name()].versions) g_core->fill_stats(kv.second.get(), o->add_model_stats());
  }
  return Status::OK;
}
Status do_RepositoryIndex(const pb::RepositoryIndexRequest&, pb::RepositoryIndexResponse* o) {
  if (draining()) return shutting_down();
  for (ModelVersion* mv : g_core->all) {
    auto* m = o->add_models();
    m->set_name(mv->name());
    m->set_version(mv->version());
    m->set_state("READY");
  }
  return Status::OK;
}
Status no_repository_control() {
  return Status(StatusCode::FAILED_PRECONDITION,
                "repository control is not available with --frontend native; restart the "
                "server to change models");
}
Status do_RepositoryModelLoad(const pb::RepositoryModelLoadRequest&, pb::RepositoryModelLoadResponse*) {
  if (draining()) return shutting_down();
  return no_repository_control();
}
Status do_RepositoryModelUnload(const pb::RepositoryModelUnloadRequest&,
                                pb::RepositoryModelUnloadResponse*) {
  if (draining()) return shutting_down();
  return no_repository_control();
}

// One method's raw call: request bytes in, response bytes (or an error status) out.
using RequestFn = void (AsyncService::*)(grpc::ServerContext*, grpc::ByteBuffer*,
                                         grpc::ServerAsyncResponseWriter<grpc::ByteBuffer>*,
                                         grpc::CompletionQueue*, grpc::ServerCompletionQueue*,
                                         void*);
using HandleFn = Status (*)(const grpc::ByteBuffer*, grpc::ByteBuffer*);
struct UnaryMethod {
  RequestFn request;
  HandleFn handle;
};

#define UNARY(METHOD, REQ, RESP)                                                  \
  Status handle_##METHOD(const grpc::ByteBuffer* in, grpc::ByteBuffer* out) {     \
    pb::REQ req;                                                                  \
    pb::RESP resp;                                                                \
    Status st = parse_request(in, &req);                                          \
    if (st.ok()) st = do_##METHOD(req, &resp);                                    \
    if (st.ok()) st = serialize_response(resp, out);                              \
    return st;                                                                    \
  }
UNARY(ServerLive, ServerLiveRequest, ServerLiveResponse)
UNARY(ServerReady, ServerReadyRequest, ServerReadyResponse)
UNARY(ModelReady, ModelReadyRequest, ModelReadyResponse)
UNARY(ServerMetadata, ServerMetadataRequest, ServerMetadataResponse)
UNARY(ModelMetadata, ModelMetadataRequest, ModelMetadataResponse)
UNARY(ModelConfig, ModelConfigRequest, ModelConfigResponse)
UNARY(ModelStatistics, ModelStatisticsRequest, ModelStatisticsResponse)
UNARY(RepositoryIndex, RepositoryIndexRequest, RepositoryIndexResponse)
UNARY(RepositoryModelLoad, RepositoryModelLoadRequest, RepositoryModelLoadResponse)
UNARY(RepositoryModelUnload, RepositoryModelUnloadRequest, RepositoryModelUnloadResponse)
#undef UNARY

const UnaryMethod kUnaryMethods[] = {
    {&AsyncService::RequestServerLive, handle_ServerLive},
    {&AsyncService::RequestServerReady, handle_ServerReady},
    {&AsyncService::RequestModelReady, handle_ModelReady},
    {&AsyncService::RequestServerMetadata, handle_ServerMetadata},
    {&AsyncService::RequestModelMetadata, handle_ModelMetadata},
    {&AsyncService::RequestModelConfig, handle_ModelConfig},
    {&AsyncService::RequestModelStatistics, handle_ModelStatistics},
    {&AsyncService::RequestRepositoryIndex, handle_RepositoryIndex},
    {&AsyncService::RequestRepositoryModelLoad, handle_RepositoryModelLoad},
    {&AsyncService::RequestRepositoryModelUnload, handle_RepositoryModelUnload},
};

// Answers a unary call: the response bytes, or the error status (gRPC's writer sends no message
// with an error).
void answer(grpc::ServerAsyncResponseWriter<grpc::ByteBuffer>* w, const grpc::ByteBuffer& out,
            const Status& st, Tag* tag) {
  if (st.ok()) {
    w->Finish(out, st, tag);
  } else {
    w->FinishWithError(st, tag);
  }
}

// A call of one of kUnaryMethods. Completions: its arrival (then it is answered at once), and its
// answer sent.
class UnaryCall final : public Tag {
 public:
  // Asks gRPC for the method's next call.
  static void await(const UnaryMethod* m, Queue* q) {
    auto* c = new UnaryCall(m, q);
    (g_rpc->service.*(m->request))(&c->ctx_, &c->in_, &c->writer_, &q->quiet, q->cq.get(),
                                   static_cast<Tag*>(c));
  }
  void proceed(bool ok) override {
    if (answered_) {  // the answer went out (or the client left)
      q_->open--;
      delete this;
      return;
    }
    if (!ok) {  // shutdown: no call came
      delete this;
      return;
    }
    answered_ = true;
    q_->open++;
    await(m_, q_);  // the method's next call
    answer(&writer_, out_, m_->handle(&in_, &out_), this);
  }

 private:
  UnaryCall(const UnaryMethod* m, Queue* q) : m_(m), q_(q) {}
  const UnaryMethod* m_;
  Queue* q_;
  grpc::ServerContext ctx_;
  grpc::ByteBuffer in_, out_;
  grpc::ServerAsyncResponseWriter<grpc::ByteBuffer> writer_{&ctx_};
  bool answered_ = false;
};

// ---------------------------------------------------------------------------------------------
// ModelInfer (unary).

// A ModelInfer call, and its request's Pending. Completions: its arrival (parsed, validated and
// queued or run inline there), its answer sent (Finish, from whichever thread ran it) and the call
// done; it is deleted on the last of the last two.
struct InferCall final : Pending, Tag {
  Queue* q;
  grpc::ServerContext sctx;
  grpc::ByteBuffer in_bytes, out_bytes;
  grpc::ServerAsyncResponseWriter<grpc::ByteBuffer> writer{&sctx};
  pb::ModelInferRequest own;
  pb::ModelInferResponse own_resp;
  bool accepted = false;  // entered the server's in-flight count
  bool arrived = false;
  int left = 2;  // completions still to come once arrived: answer sent, call done (q's thread only)
  void on_call_done(bool) { release(); }
  Hop<InferCall, &InferCall::on_call_done> done_tag{this};

  explicit InferCall(Queue* queue) : q(queue) {
    req = &own;
    resp = &own_resp;
    ctx = &sctx;
    sctx.AsyncNotifyWhenDone(static_cast<Tag*>(&done_tag));
  }
  static void await(Queue* queue) {
    auto* c = new InferCall(queue);
    g_rpc->service.RequestModelInfer(&c->sctx, &c->in_bytes, &c->writer, &queue->quiet,
                                     queue->cq.get(), static_cast<Tag*>(c));
  }
  void proceed(bool ok) override {
    if (arrived) {  // the answer went out (ok) or the call broke (!ok)
      release();
      return;
    }
    if (!ok) {  // shutdown: no call came (and no "done" will)
      delete this;
      return;
    }
    arrived = true;
    q->open++;
    await(q);  // the next ModelInfer call
    t_start = now_ns();
    Status pst = parse_infer_request(&in_bytes, this, &own);
    if (!pst.ok()) {  // counted under "<unknown>" (mv is null)
      done(pst);
      return;
    }
    if (!g_core->enter()) {
      mv = g_core->find_quiet(own);
      done(Status(StatusCode::UNAVAILABLE, kShuttingDown));
      return;
    }
    accepted = true;
    Status st = g_core->submit(this);
    if (!st.ok()) done(st);  // else this may be answered already: do not touch it
  }
  void release() {
    if (--left > 0) return;
    q->open--;
    delete this;
  }
  void done(const Status& st) override {
    Status fst = st.ok() ? serialize_response(own_resp, &out_bytes) : st;
    g_core->account(this, fst.error_code());
    if (accepted) g_core->leave();  // before the answer leaves: a client reading /metrics after it sees it gone
    answer(&writer, out_bytes, fst, this);
    // From here the queue's thread may delete this.
  }
};

// ---------------------------------------------------------------------------------------------
// ModelStreamInfer.

struct StreamPending final : Pending {
  StreamCall* call = nullptr;
  bool accepted = false;  // entered the server's in-flight count
  grpc::ByteBuffer in_bytes, out_bytes;  // the message as read; the answer as written
  pb::ModelInferRequest own;
  pb::ModelStreamInferResponse out;
  StreamPending() {
    req = &own;
    resp = out.mutable_infer_response();
  }
  void done(const Status& st) override;
};

// Threads: the call's completions (arrival, a read, a write, Finish, the call done) come on its
// queue's thread; deliver() runs on a worker (on main via abort_queued; on the queue's thread for
// a refused message or one run inline, model.cc), and close() on main. A read's completion
// handles its message before the next read starts, so two never overlap; a write's completion
// and a worker's deliver() may run alongside and touch only state under mu_. The call is deleted
// (on the queue's thread) once Finish and the call's "done" have completed and no read or write
// is pending; the deletion takes Core::streams_mu first, under which close() is called, so
// close() never sees a dead call.
class StreamCall final : public Tag {
 public:
  static void await(Queue* q) {
    auto* c = new StreamCall(q);
    g_rpc->service.RequestModelStreamInfer(&c->ctx_, &c->rw_, q->cq.get(), q->cq.get(),
                                           static_cast<Tag*>(c));
  }

  // The call's arrival.
  void proceed(bool ok) override {
    if (!ok) {  // shutdown: no call came (and no "done" will)
      delete this;
      return;
    }
    await(q_);  // the next stream
    bool closing;
    {
      std::lock_guard<std::mutex> g(g_core->streams_mu);
      closing = g_core->streams_closing;
      if (!closing) g_core->streams.insert(this);
    }
    std::lock_guard<std::mutex> g(mu_);
    if (closing) {  // the drain is ending the streams: this one too, before it reads anything
      closing_ = true;
      finish_if_due_locked();
      return;
    }
    read_locked();
  }

  // A finished message (from a worker or a handler): write it, in completion order.
  void deliver(StreamPending* p) {
    std::lock_guard<std::mutex> g(mu_);
    if (broken_ || finished_) {
      retire_locked(p);
      finish_if_due_locked();
      return;
    }
    outq_.push_back(p);
    if (!write_pending_) write_locked();
  }

  // The drain answered every accepted request (main, under Core::streams_mu): end the stream
  // with UNAVAILABLE once what it has read is written (at once when idle); read no more.
  void close() {
    std::lock_guard<std::mutex> g(mu_);
    closing_ = true;
    finish_if_due_locked();
  }

 private:
  explicit StreamCall(Queue* q) : q_(q) {
    ctx_.AsyncNotifyWhenDone(static_cast<Tag*>(&done_tag_));
  }
  ~StreamCall() { delete next_; }

  void on_read(bool ok) {
    StreamPending* p;
    {
      std::lock_guard<std::mutex> g(mu_);
      read_pending_ = false;
      if (!ok) {  // client half-closed, or the call broke or was finished
        delete next_;
        next_ = nullptr;
        reads_done_ = true;
        finish_if_due_locked();
        if (!dead_locked()) return;
      } else {
        p = next_;
        next_ = nullptr;
        window_++;
        handling_ = true;  // no Finish until this message is handled
      }
    }
    if (!ok) {
      destroy();
      return;
    }
    p->call = this;
    p->ctx = &ctx_;
    p->t_start = now_ns();
    // The message is handled before the next one is read: a cheap model runs it inline here
    // (model.cc), and reading the next message first had the stream's next message handled on
    // another thread, handing the stream back and forth (round 4). A queued message (an expensive
    // model) costs only the submit here, so the stream's next messages still reach the other
    // sessions at once.
    Status pst = parse_infer_request(&p->in_bytes, p, &p->own);
    if (!pst.ok()) {  // in-band INVALID_ARGUMENT (empty id), counted under "<unknown>"; read on
      p->done(pst);
    } else if (!g_core->enter()) {
      p->mv = g_core->find_quiet(p->own);
      p->done(Status(StatusCode::UNAVAILABLE, kShuttingDown));
    } else {
      p->accepted = true;
      Status st = g_core->submit(p);
      if (!st.ok()) p->done(st);
    }
    std::lock_guard<std::mutex> g(mu_);
    handling_ = false;
    if (!finished_ && !closing_) {  // else no more reads
      if (window_ < kStreamWindow) {
        read_locked();
      } else {
        paused_ = true;  // flow control: resumed when a response is written
      }
    }
    finish_if_due_locked();  // the drain's close() may have come meanwhile
  }

  void on_write(bool ok) {
    {
      std::lock_guard<std::mutex> g(mu_);
      write_pending_ = false;
      StreamPending* p = outq_.front();
      outq_.pop_front();
      retire_locked(p);
      if (!ok) {  // the client is gone: drop what is left (its requests were answered as far as we can)
        broken_ = true;
        while (!outq_.empty()) {
          retire_locked(outq_.front());
          outq_.pop_front();
        }
      }
      if (!outq_.empty()) write_locked();
      finish_if_due_locked();
      if (!dead_locked()) return;
    }
    destroy();
  }

  void on_finish(bool) {
    {
      std::lock_guard<std::mutex> g(mu_);
      finish_pending_ = false;
      if (!dead_locked()) return;
    }
    destroy();
  }

  void on_call_done(bool) {
    {
      std::lock_guard<std::mutex> g(mu_);
      call_done_ = true;
      if (!dead_locked()) return;
    }
    destroy();
  }

  void read_locked() {
    next_ = new StreamPending();
    read_pending_ = true;
    rw_.Read(&next_->in_bytes, static_cast<Tag*>(&read_tag_));
  }
  void write_locked() {
    write_pending_ = true;
    rw_.Write(outq_.front()->out_bytes, static_cast<Tag*>(&write_tag_));
  }
  void retire_locked(StreamPending* p) {
    delete p;
    window_--;
    if (paused_ && window_ < kStreamWindow && !reads_done_ && !finished_ && !closing_) {
      paused_ = false;
      read_locked();
    }
  }
  // Finishes the call once nothing it read is unanswered and no write is pending: OK after the
  // client's half-close, UNAVAILABLE when the drain closes it.
  void finish_if_due_locked() {
    if (finished_ || write_pending_ || handling_ || window_ > 0) return;
    Status st;
    if (reads_done_) {
      st = Status::OK;
    } else if (closing_) {
      st = Status(StatusCode::UNAVAILABLE, kShuttingDown);
    } else {
      return;
    }
    finished_ = true;
    finish_pending_ = true;
    rw_.Finish(st, static_cast<Tag*>(&finish_tag_));
  }
  // Every operation of the call has completed: nothing will touch it again.
  bool dead_locked() const {
    return finished_ && !finish_pending_ && call_done_ && !read_pending_ && !write_pending_;
  }
  void destroy() {
    {
      std::lock_guard<std::mutex> g(g_core->streams_mu);
      g_core->streams.erase(this);
    }
    delete this;
  }

  Queue* q_;
  grpc::ServerContext ctx_;
  grpc::ServerAsyncReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer> rw_{&ctx_};
  Hop<StreamCall, &StreamCall::on_read> read_tag_{this};
  Hop<StreamCall, &StreamCall::on_write> write_tag_{this};
  Hop<StreamCall, &StreamCall::on_finish> finish_tag_{this};
  Hop<StreamCall, &StreamCall::on_call_done> done_tag_{this};
  std::mutex mu_;
  StreamPending* next_ = nullptr;  // the message being read
  std::deque<StreamPending*> outq_;  // front: being written
  int window_ = 0;  // messages read and not yet written or dropped
  bool read_pending_ = false, write_pending_ = false, finish_pending_ = false, call_done_ = false;
  bool reads_done_ = false, finished_ = false, paused_ = false, broken_ = false;
  bool closing_ = false;  // the drain asked it to end
  bool handling_ = false;  // a read's completion is handling its message (and will read on or finish)
};

void StreamPending::done(const Status& st) {
  g_core->account(this, st.error_code());
  if (!st.ok()) {
    std::string id = own.id(), model = own.model_name(), version = own.model_version();
    out.Clear();
    out.set_error_message(std::string("[") + code_name(st.error_code()) + "] " + st.error_message());
    auto* r = out.mutable_infer_response();
    r->set_id(id);
    r->set_model_name(model);
    r->set_model_version(version);
  }
  pb::ModelInferRequest().Swap(&own);  // the request is no longer needed: free it (Clear keeps capacity)
  Status sst = serialize_response(out, &out_bytes);
  if (!sst.ok()) {
    out.Clear();
    out.set_error_message(std::string("[") + code_name(sst.error_code()) + "] " + sst.error_message());
    serialize_response(out, &out_bytes);
  }
  pb::ModelStreamInferResponse().Swap(&out);  // serialized: free the message
  if (accepted) g_core->leave();  // answered: uncounted before the answer goes to gRPC
  call->deliver(this);
}

// ---------------------------------------------------------------------------------------------
// grpc.health.v1 (health.proto): "" (the server), inference.GRPCInferenceService and each
// model's name are SERVING until the drain begins, then NOT_SERVING. Check on any other name gets
// NOT_FOUND, Watch SERVICE_UNKNOWN, as gRPC's and grpcio-health-checking's services answer. A
// sync service, on gRPC's sync-server threads as reflection is (see the RPC layer's comment for
// why not gRPC's default one).
namespace hv1 = grpc::health::v1;

class HealthService final : public hv1::Health::Service {
 public:
  void add(const std::string& name) { names_.insert(name); }  // before the server starts
  // The drain began: every name NOT_SERVING (watchers are told).
  void set_not_serving() {
    std::lock_guard<std::mutex> g(mu_);
    serving_ = false;
    cv_.notify_all();
  }
  // The server is about to stop: Watch calls end (UNAVAILABLE), so none holds the shutdown.
  void close() {
    std::lock_guard<std::mutex> g(mu_);
    closed_ = true;
    cv_.notify_all();
  }

  grpc::Status Check(grpc::ServerContext*, const hv1::HealthCheckRequest* r,
                     hv1::HealthCheckResponse* o) override {
    if (!names_.count(r->service()))
      return Status(StatusCode::NOT_FOUND, "unknown service '" + r->service() + "'; health is served for '' (the server), " +
                                               "inference.GRPCInferenceService and each model's name");
    std::lock_guard<std::mutex> g(mu_);
    o->set_status(status_locked(true));
    return Status::OK;
  }

  grpc::Status Watch(grpc::ServerContext* ctx, const hv1::HealthCheckRequest* r,
                     grpc::ServerWriter<hv1::HealthCheckResponse>* w) override {
    const bool known = names_.count(r->service()) > 0;
    Serving sent = hv1::HealthCheckResponse::UNKNOWN;  // never a status served: the first goes out
    std::unique_lock<std::mutex> lk(mu_);
    while (true) {
      if (const Serving now = status_locked(known); now != sent) {
        sent = now;
        hv1::HealthCheckResponse o;
        o.set_status(sent);
        lk.unlock();
        const bool ok = w->Write(o);
        lk.lock();
        if (!ok) return Status(StatusCode::CANCELLED, "the client is gone");
      }
      if (closed_) return Status(StatusCode::UNAVAILABLE, kShuttingDown);
      // A sync handler gets no wake-up when its client leaves: it looks once a second.
      cv_.wait_for(lk, std::chrono::seconds(1), [&] { return status_locked(known) != sent || closed_; });
      if (ctx->IsCancelled()) return Status(StatusCode::CANCELLED, "the client is gone");
    }
  }

 private:
  using Serving = hv1::HealthCheckResponse::ServingStatus;
  Serving status_locked(bool known) const {
    if (!known) return hv1::HealthCheckResponse::SERVICE_UNKNOWN;
    return serving_ ? hv1::HealthCheckResponse::SERVING : hv1::HealthCheckResponse::NOT_SERVING;
  }

  std::set<std::string> names_;  // fixed once serving
  std::mutex mu_;
  std::condition_variable cv_;
  bool serving_ = true, closed_ = false;
};

// A queue's thread: handles what comes on its server queue and, while a unary call is open,
// drains its quiet queue every kQuietDrainMs (waking for it when nothing else comes), until the
// server queue is shut down and empty; then the quiet queue's last completions. Not on every
// wake-up: a look at an empty quiet queue is a futex wait with a past deadline, which cost a
// digits request over a stream 0.05 ms when done for every event.
//
// The thread runs SCHED_BATCH: its wake-ups (a request's bytes arriving) do not preempt a running
// onnxruntime worker; it runs when a core frees or the worker's slice ends, and handles what
// arrived meanwhile in one turn. With every core busy that is fewer context switches for the
// same work: vol3d at 16 in flight, its share 0.05-0.07 vs 0.08-0.10 ms a request, the server's
// CPU a sample about 1% lower (the workers' about 0.5% higher); digits unchanged; a digits
// request at 1 in flight beside a vol3d load no slower (round 9, docs/performance-notes.md). An
// idle core still runs it at once.
// Its name and policy are set by its creator (start_queue_thread), before the server reports
// ready.
void drain_queue(Queue* q) {
  void* tag = nullptr;
  bool ok = false;
  const int64_t every_ns = int64_t(kQuietDrainMs) * 1000000;
  int64_t drained_ns = now_ns();
  while (true) {
    gpr_timespec deadline = gpr_inf_future(GPR_CLOCK_MONOTONIC);
    if (q->open > 0) {
      int64_t t = now_ns();
      if (t - drained_ns >= every_ns) {
        while (q->quiet.AsyncNext(&tag, &ok, gpr_inf_past(GPR_CLOCK_MONOTONIC)) ==
               grpc::CompletionQueue::GOT_EVENT)
          static_cast<Tag*>(tag)->proceed(ok);
        drained_ns = t;
      }
      if (q->open > 0)  // still: wake for the next drain if nothing comes before
        deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                gpr_time_from_nanos(drained_ns + every_ns - t, GPR_TIMESPAN));
    }
    const auto st = q->cq->AsyncNext(&tag, &ok, deadline);
    if (st == grpc::CompletionQueue::SHUTDOWN) break;
    if (st == grpc::CompletionQueue::GOT_EVENT) static_cast<Tag*>(tag)->proceed(ok);
  }
  q->quiet.Shutdown();
  while (q->quiet.Next(&tag, &ok)) static_cast<Tag*>(tag)->proceed(ok);
}

// ---------------------------------------------------------------------------------------------
// Start-up.

// A library's log message on one line (newlines become spaces).
std::string one_line(std::string m) {
  for (char& c : m)
    if (c == '\n' || c == '\r') c = ' ';
  return m;
}

// gRPC's own log lines, flattened to one line each through logf (errors and warnings; more
// with log_level DEBUG). Silent while the server starts: a failure there gets our own line.
std::atomic<bool> g_grpc_quiet{true};
void grpc_log(gpr_log_func_args* a) {
  if (g_grpc_quiet.load(std::memory_order_relaxed)) return;
  int level = a->severity == GPR_LOG_SEVERITY_ERROR ? kError
              : a->severity == GPR_LOG_SEVERITY_INFO ? kInfo : kDebug;
  if (level < kError && g_log_level > kDebug) return;
  logf(level, "grpc: %s", one_line(a->message ? a->message : "").c_str());
}

// libprotobuf's own lines. It logs an ERROR for every message whose string field is not valid
// UTF-8 (the parse then fails and the caller gets INVALID_ARGUMENT): a client could flood the
// log, so at most one line a second goes out, saying how many were left out before it.
void protobuf_log(google::protobuf::LogLevel level, const char* file, int line,
                  const std::string& message) {
  static std::mutex mu;
  static int64_t last_ns = 0, left_out = 0;
  const int64_t now = now_ns();
  int64_t skipped;
  {
    std::lock_guard<std::mutex> g(mu);
    if (last_ns != 0 && now - last_ns < 1000000000) {
      left_out++;
      return;
    }
    last_ns = now;
    skipped = left_out;
    left_out = 0;
  }
  int lv = level >= google::protobuf::LOGLEVEL_ERROR     ? kError
           : level == google::protobuf::LOGLEVEL_WARNING ? kWarning
                                                         : kInfo;
  logf(lv, "protobuf: %s (%s:%d; %lld protobuf lines left out since the previous one)",
       one_line(message).c_str(), file, line, (long long)skipped);
}

[[noreturn]] void die(const std::string& msg) {
  logf(kError, "%s", msg.c_str());
  std::fflush(stderr);
  _exit(2);
}

std::string host_port(const std::string& host, int port) {
  bool v6 = host.find(':') != std::string::npos && host.front() != '[';
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

template <class M>
void parse_pb(const nlohmann::json& j, const char* key, M* out, const std::string& what) {
  if (!j.contains(key)) return;  // optional: an empty message
  std::string raw;
  if (!base64_decode(j.at(key).get<std::string>(), &raw) || !out->ParseFromString(raw))
    die("bad plan: " + what + ": " + key + " is not a base64 serialized " + out->GetTypeName());
}

struct Plan {
  std::string host = "127.0.0.1", metrics_host = "127.0.0.1", log_level = "INFO";
  int port = 0, metrics_port = -1;
  double grace_s = 10.0;
  double drain_quiet_s = 0.1;  // server/config.py DRAIN_QUIET_S
  int64_t max_message_bytes = 64 << 20;
  std::vector<double> latency_buckets, size_buckets;
  // TLS (the plan's "tls", checked by server/security.py before the exec): PEM files' bytes; an
  // empty cert means plaintext, a client CA means mutual TLS.
  std::string tls_cert_pem, tls_key_pem, tls_client_ca_pem;
};

// The listening port's credentials from the plan, and how the start-up line describes them.
std::shared_ptr<grpc::ServerCredentials> server_credentials(const Plan& plan, std::string* desc) {
  if (plan.tls_cert_pem.empty()) {
    *desc = "plaintext";
    return grpc::InsecureServerCredentials();
  }
  const bool mutual = !plan.tls_client_ca_pem.empty();
  grpc::SslServerCredentialsOptions opts(
      mutual ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
             : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  opts.pem_key_cert_pairs.push_back({plan.tls_key_pem, plan.tls_cert_pem});
  opts.pem_root_certs = plan.tls_client_ca_pem;
  *desc = mutual ? "mutual TLS" : "TLS";
  return grpc::SslServerCredentials(opts);
}

std::thread start_queue_thread(Queue* q) {
  std::thread t(drain_queue, q);
  pthread_setname_np(t.native_handle(), "bnn-grpc");
  sched_param batch{};
  if (int e = pthread_setschedparam(t.native_handle(), SCHED_BATCH, &batch); e != 0)
    logf(kInfo, "bnn-grpc: SCHED_BATCH not set (%s); running SCHED_OTHER", std::strerror(e));
  return t;
}

}  // namespace
}  // namespace bnn

int main(int argc, char** argv) {
  using namespace bnn;
  const int64_t t_start = now_ns();
  std::string plan_path;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--plan" && i + 1 < argc) plan_path = argv[++i];
    else die("usage: bnserve_native --plan PLAN.json");
  }
  if (plan_path.empty()) die("usage: bnserve_native --plan PLAN.json");

  // A request's tensors are buffers of 128 KiB and more (vol3d: 128 KiB a sample), at glibc's
  // default mmap threshold: such buffers were mapped and unmapped per request, and the freed top
  // of the heap given back, so the next request page-faulted its memory in again (perf: page
  // faults and clear_page on gRPC's threads). Keep them in the heap instead.
  mallopt(M_MMAP_THRESHOLD, 4 << 20);
  mallopt(M_TRIM_THRESHOLD, 64 << 20);

  // SIGINT/SIGTERM blocked in every thread; main waits for them with sigwait.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);

  static Core core;
  g_core = &core;
  static Plan plan;
  nlohmann::json j;
  {
    std::ifstream f(plan_path);
    if (!f) die("cannot read plan " + plan_path);
    try {
      j = nlohmann::json::parse(f);
    } catch (const std::exception& e) {
      die("bad plan " + plan_path + ": " + e.what());
    }
  }
  // The plan comes in an inherited in-memory file (server/native_frontend.py): close it once
  // read, so the TLS key it may hold is not left open in the serving process.
  if (int fd = -1; std::sscanf(plan_path.c_str(), "/proc/self/fd/%d", &fd) == 1 && fd > 2) close(fd);
  static Ort::Env* env = nullptr;
  try {
    plan.host = j.value("host", plan.host);
    plan.port = j.value("port", 0);
    plan.metrics_host = j.value("metrics_host", plan.metrics_host);
    plan.metrics_port = j.value("metrics_port", -1);
    plan.grace_s = j.value("grace_s", 10.0);
    plan.drain_quiet_s = j.at("drain_quiet_s").get<double>();
    plan.max_message_bytes = j.value("max_message_bytes", plan.max_message_bytes);
    plan.log_level = j.value("log_level", plan.log_level);
    if (j.contains("tls")) {  // base64 of the PEM files' bytes
      const auto& t = j.at("tls");
      auto pem = [&](const char* key, std::string* out) {
        if (!base64_decode(t.at(key).get<std::string>(), out) || out->empty())
          die(std::string("bad plan: tls.") + key + " is not base64 PEM");
      };
      pem("cert", &plan.tls_cert_pem);
      pem("key", &plan.tls_key_pem);
      if (t.contains("client_ca")) pem("client_ca", &plan.tls_client_ca_pem);
    }
    for (char& c : plan.log_level) c = char(std::toupper((unsigned char)c));
    if (plan.log_level == "DEBUG") g_log_level = kDebug;
    else if (plan.log_level == "WARNING") g_log_level = kWarning;
    else if (plan.log_level == "ERROR" || plan.log_level == "CRITICAL") g_log_level = kError;
    plan.latency_buckets = j.value("latency_buckets", std::vector<double>{
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10});
    plan.size_buckets = j.value("batch_size_buckets", std::vector<double>{1, 2, 4, 8, 16, 32, 64, 128, 256});
    std::sort(plan.latency_buckets.begin(), plan.latency_buckets.end());
    std::sort(plan.size_buckets.begin(), plan.size_buckets.end());
    core.unknown.model = "<unknown>";
    core.unknown.init(&plan.latency_buckets, &plan.size_buckets);
    parse_pb(j, "server_metadata_pb", &core.server_metadata, "server");
    env = new Ort::Env(ORT_LOGGING_LEVEL_WARNING, "bnserve_native");
    for (const auto& jm : j.at("models")) {
      Model m;
      m.name = jm.at("name").get<std::string>();
      m.default_version = jm.value("default_version", std::string());
      for (const auto& jv : jm.at("versions")) {
        VersionPlan vp;
        vp.name = m.name;
        vp.version = jv.at("version").get<std::string>();
        vp.path = jv.at("path").get<std::string>();
        vp.instances = jv.value("instances", 1);
        vp.max_batch_size = jv.value("max_batch_size", int64_t(0));
        vp.max_queue_size = jv.value("max_queue_size", int64_t(1024));
        auto mc = jv.find("max_combined_batch_size");
        vp.max_combined = (mc != jv.end() && !mc->is_null()) ? mc->get<int64_t>() : vp.max_batch_size;
        vp.delay_us = jv.value("max_queue_delay_us", int64_t(0));
        auto pref = jv.find("preferred_batch_sizes");
        if (pref != jv.end() && !pref->is_null()) vp.preferred = pref->get<std::vector<int64_t>>();
        std::unique_ptr<ModelVersion> mv;
        try {
          mv = std::make_unique<ModelVersion>(*env, vp, &plan.latency_buckets, &plan.size_buckets);
        } catch (const std::exception& e) {
          die("model load failed: " + vp.name + " version " + vp.version + " (" + vp.path + "): " + e.what());
        }
        parse_pb(jv, "metadata_pb", &mv->metadata, vp.name + " version " + vp.version);
        parse_pb(jv, "config_pb", &mv->config, vp.name + " version " + vp.version);
        m.versions_list += (m.versions_list.empty() ? "" : ", ") + vp.version;
        core.all.push_back(mv.get());
        m.versions[vp.version] = std::move(mv);
      }
      const bool pick = m.default_version.empty();
      for (auto& kv : m.versions)  // no default given: the highest version (numerically)
        if (pick && (m.default_version.empty() ||
            std::make_pair(kv.first.size(), kv.first) >
                std::make_pair(m.default_version.size(), m.default_version)))
          m.default_version = kv.first;
      if (!m.versions.count(m.default_version))
        die("bad plan: model " + m.name + ": default_version '" + m.default_version + "' is not among its versions");
      m.unknown_version = std::make_unique<VersionStats>();
      m.unknown_version->model = m.name;
      m.unknown_version->version = "<unknown>";
      m.unknown_version->init(&plan.latency_buckets, &plan.size_buckets);
      std::string name = m.name;
      core.models.emplace(name, std::move(m));
    }
  } catch (const nlohmann::json::exception& e) {
    die(std::string("bad plan ") + plan_path + ": " + e.what());
  }
  if (core.all.empty()) die("bad plan " + plan_path + ": no model versions to serve");

  // Metrics endpoint first (a bind failure must not leave a half-started gRPC server).
  core.unknown_all.push_back(&core.unknown);
  for (auto& kv : core.models) core.unknown_all.push_back(kv.second.unknown_version.get());
  MetricsServer metrics(&core.all, &core.unknown_all, &core.inflight, &core.accepting);
  std::string metrics_desc = "off";
  if (plan.metrics_port >= 0) {
    std::string err;
    int mport = metrics.start(plan.metrics_host, plan.metrics_port, &err);
    if (mport < 0) die("cannot serve metrics on " + host_port(plan.metrics_host, plan.metrics_port) + ": " + err);
    metrics_desc = host_port(plan.metrics_host, mport) + "/metrics";  // as the Python one says
  }

  for (ModelVersion* mv : core.all) mv->start();

  // Debian's abseil tracks every Mutex's lock order for deadlock detection (GraphCycles showed
  // in perf): a debugging aid that costs each request, off as in abseil's release builds.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  gpr_set_log_function(grpc_log);
  google::protobuf::SetLogHandler(protobuf_log);
  grpc::EnableDefaultHealthCheckService(false);  // ours: HealthService
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  static Rpc rpc;
  g_rpc = &rpc;
  static HealthService health;
  health.add("");
  health.add("inference.GRPCInferenceService");
  std::string names;
  for (auto& kv : core.models) {
    health.add(kv.first);
    names += (names.empty() ? "" : ", ") + kv.first;
  }
  grpc::ServerBuilder b;
  int bound = 0;
  std::string security;
  b.AddListeningPort(host_port(plan.host, plan.port), server_credentials(plan, &security), &bound);
  b.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);  // a port in use is an error, not shared
  int maxmsg = int(std::min<int64_t>(plan.max_message_bytes, INT32_MAX));
  b.SetMaxReceiveMessageSize(maxmsg);
  b.SetMaxSendMessageSize(maxmsg);
  b.RegisterService(&rpc.service);
  b.RegisterService(&health);
  // One completion queue and thread for every 4 cores (at least one): threads that share a
  // queue take turns at its poller, the hand-off this layer is built to avoid.
  const unsigned nq = std::max(1u, std::thread::hardware_concurrency() / 4);
  for (unsigned i = 0; i < nq; ++i) {
    rpc.queues.push_back(std::make_unique<Queue>());
    rpc.queues.back()->cq = b.AddCompletionQueue();
  }
  std::unique_ptr<grpc::Server> server = b.BuildAndStart();
  if (!server || bound == 0) die("cannot listen on " + host_port(plan.host, plan.port) + " (port in use?)");
  // Calls are asked for ahead, on every queue; each call that comes asks for the next one. A call
  // that finds none asked for waits in gRPC until one is.
  for (auto& q : rpc.queues) {
    for (const UnaryMethod& m : kUnaryMethods)
      for (int i = 0; i < 2; ++i) UnaryCall::await(&m, q.get());
    for (int i = 0; i < 64; ++i) InferCall::await(q.get());
    for (int i = 0; i < 8; ++i) StreamCall::await(q.get());
  }
  std::vector<std::thread> cq_threads;
  for (auto& q : rpc.queues) cq_threads.push_back(start_queue_thread(q.get()));

  g_grpc_quiet.store(false);
  logf(kInfo, "serving %s on %s (native, %s; metrics %s) in %.2f s", names.c_str(),
       host_port(plan.host, bound).c_str(), security.c_str(), metrics_desc.c_str(),
       double(now_ns() - t_start) * 1e-9);

  int sig = 0;
  sigwait(&sigs, &sig);

  // Drain: refuse new work, let everything accepted finish, then stop.
  const auto drain_deadline = std::chrono::system_clock::now() +
                              std::chrono::microseconds(int64_t(plan.grace_s * 1e6));
  core.accepting.store(false);
  core.refused();  // the quiet period below counts from the signal at the earliest
  health.set_not_serving();
  logf(kInfo, "draining: %lld request(s) in flight, grace %g s",
       (long long)core.inflight.load(), plan.grace_s);
  int64_t unanswered = 0;
  bool drained;
  {
    std::unique_lock<std::mutex> lk(core.drain_mu);
    drained = core.drain_cv.wait_until(lk, drain_deadline, [&] {
      unanswered = core.inflight.load();
      return unanswered <= 0;
    });
  }
  if (drained) {
    // gRPC's Shutdown cancels (CANCELLED) every call that has reached it but no handler yet; a
    // client cannot tell that from its own cancellation and will not retry elsewhere. So the
    // port closes once the refusals have stopped: every client that was sending has had its
    // UNAVAILABLE. Within the grace period.
    const int64_t quiet_ns = int64_t(plan.drain_quiet_s * 1e9);
    for (int64_t wait; (wait = core.last_refusal_ns.load() + quiet_ns - now_ns()) > 0;) {
      const std::chrono::nanoseconds left(wait);
      if (std::chrono::system_clock::now() + left > drain_deadline) break;
      std::this_thread::sleep_for(left);
    }
    // Every accepted request is answered: end the streams (an idle one at once, the others once
    // their answers are written), so an open stream does not hold the shutdown for the grace.
    unanswered = 0;
    std::lock_guard<std::mutex> g(core.streams_mu);
    core.streams_closing = true;
    for (StreamCall* c : core.streams) c->close();
  } else {
    Status st(StatusCode::UNAVAILABLE, "server shut down before the request ran (drain grace ran out)");
    for (ModelVersion* mv : core.all) mv->abort_queued(st);
  }
  health.close();
  // Returns once every call is done (the queues' threads keep answering meanwhile); calls asked
  // for and never come complete with !ok.
  server->Shutdown(drained ? drain_deadline : std::chrono::system_clock::now());
  server->Wait();
  for (ModelVersion* mv : core.all) mv->stop();
  for (auto& q : rpc.queues) q->cq->Shutdown();  // nothing starts an operation any more
  for (std::thread& t : cq_threads) t.join();
  metrics.stop();
  if (!drained) {
    logf(kError, "grace of %g s ran out: %lld request(s) in flight were cancelled unanswered",
         plan.grace_s, (long long)unanswered);
    std::fflush(stderr);
    _exit(1);
  }
  logf(kInfo, "stopped cleanly: every accepted request was answered");
  std::fflush(stderr);
  _exit(0);
}
