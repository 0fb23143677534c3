#include "model.h"

#include <pthread.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string_view>

namespace bnn {

namespace {

constexpr const char* kWorkerThreadName = "bnn-ort";  // bench/suite.py ORT_THREAD
constexpr size_t kShrinkInputBytes = 512 * 1024;  // as bnserve's ARENA_KEEP_INPUT_BYTES
// A model whose batches take less than this (EWMA) runs a lone request on the submitting thread
// (gRPC's): a hop to a worker would cost more than the run. Before its first run a model is not
// cheap (the workers measure it).
constexpr int64_t kInlineNs = 500 * 1000;

bool dtype_of(ONNXTensorElementDataType t, DType* out) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: *out = {"FP32", pb::TYPE_FP32, 4, t}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: *out = {"FP64", pb::TYPE_FP64, 8, t}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: *out = {"FP16", pb::TYPE_FP16, 2, t}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: *out = {"INT64", pb::TYPE_INT64, 8, t}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: *out = {"INT32", pb::TYPE_INT32, 4, t}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: *out = {"INT16", pb::TYPE_INT16, 2, t}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: *out = {"INT8", pb::TYPE_INT8, 1, t}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: *out = {"UINT8", pb::TYPE_UINT8, 1, t}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: *out = {"UINT16", pb::TYPE_UINT16, 2, t}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: *out = {"UINT32", pb::TYPE_UINT32, 4, t}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: *out = {"UINT64", pb::TYPE_UINT64, 8, t}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: *out = {"BOOL", pb::TYPE_BOOL, 1, t}; return true;
    default: return false;
  }
}

std::string fmt_shape(const int64_t* d, int n) {
  std::string s = "[";
  for (int i = 0; i < n; ++i) {
    if (i) s += ", ";
    s += std::to_string(d[i]);
  }
  return s + "]";
}
std::string fmt_shape(const std::vector<int64_t>& v) { return fmt_shape(v.data(), (int)v.size()); }

TensorSpec spec(const char* name, const Ort::TypeInfo& ti) {
  TensorSpec t;
  t.name = name;
  auto info = ti.GetTensorTypeAndShapeInfo();
  if (!dtype_of(info.GetElementType(), &t.dt))
    throw std::runtime_error(std::string("unsupported element type for tensor ") + name);
  t.shape = info.GetShape();
  for (auto& d : t.shape)
    if (d < 0) d = -1;
  if (!t.shape.empty()) t.shape[0] = -1;
  return t;
}

Status bad(const std::string& m) { return Status(StatusCode::INVALID_ARGUMENT, m); }

static_assert(sizeof(bool) == 1, "onnxruntime's BOOL is one byte, as protobuf's repeated bool");

// The typed contents member carrying a datatype, as the Python front end's codec
// (server/codec.py) maps them (FP16 has none), and its values as they travel: a little-endian
// array of `count` elements of `wire` bytes each, wider than the tensor's element for INT8,
// INT16 (int32 on the wire), UINT8 and UINT16 (uint32).
struct Typed {
  const char* member = nullptr;
  const char* data = nullptr;
  int count = 0;
  size_t wire = 0;
};

template <class T>
Typed typed_of(const char* member, const google::protobuf::RepeatedField<T>& v) {
  return {member, reinterpret_cast<const char*>(v.data()), v.size(), sizeof(T)};
}

Typed typed(const pb::InferTensorContents& c, pb::DataType dt) {
  switch (dt) {
    case pb::TYPE_BOOL: return typed_of("bool_contents", c.bool_contents());
    case pb::TYPE_UINT8:
    case pb::TYPE_UINT16:
    case pb::TYPE_UINT32: return typed_of("uint_contents", c.uint_contents());
    case pb::TYPE_UINT64: return typed_of("uint64_contents", c.uint64_contents());
    case pb::TYPE_INT8:
    case pb::TYPE_INT16:
    case pb::TYPE_INT32: return typed_of("int_contents", c.int_contents());
    case pb::TYPE_INT64: return typed_of("int64_contents", c.int64_contents());
    case pb::TYPE_FP32: return typed_of("fp32_contents", c.fp32_contents());
    case pb::TYPE_FP64: return typed_of("fp64_contents", c.fp64_contents());
    default: return {};
  }
}

// The bytes of request input i of datatype dt when they are in one piece, else null (a
// raw_input_contents entry that straddles gRPC's receive slices); *n: their size either way.
// They are its raw_input_contents entry, its narrowed typed values, or its typed contents
// member itself (already the tensor's layout).
const char* input_bytes(const Pending& p, int i, const DType& dt, size_t* n) {
  const pb::ModelInferRequest& r = *p.req;
  if (!p.raw.entries.empty()) {
    const RawEntry& e = p.raw.entries[i];
    *n = e.size;
    if (e.pieces.size() > 1) return nullptr;
    return e.pieces.empty() ? "" : e.pieces[0].data();
  }
  if (size_t(i) < p.narrowed.size() && !p.narrowed[i].empty()) {
    *n = p.narrowed[i].size();
    return p.narrowed[i].data();
  }
  Typed v = typed(r.inputs(i).contents(), dt.cfg);
  *n = size_t(v.count) * v.wire;
  return v.data;
}

// Copies request input i's bytes (input_bytes') to dst; returns their size.
size_t copy_input(const Pending& p, int i, const DType& dt, char* dst) {
  if (!p.raw.entries.empty()) return p.raw.entries[i].copy_to(dst);
  size_t n;
  const char* d = input_bytes(p, i, dt, &n);
  std::memcpy(dst, d, n);
  return n;
}

// How many values each member holds, in the (sorted) order the Python front end names them.
std::vector<std::pair<std::string_view, int>> member_sizes(const pb::InferTensorContents& c) {
  return {{"bool_contents", c.bool_contents_size()},   {"bytes_contents", c.bytes_contents_size()},
          {"fp32_contents", c.fp32_contents_size()},   {"fp64_contents", c.fp64_contents_size()},
          {"int64_contents", c.int64_contents_size()}, {"int_contents", c.int_contents_size()},
          {"uint64_contents", c.uint64_contents_size()}, {"uint_contents", c.uint_contents_size()}};
}

// Narrows the wire's W values into T, or says which range they left.
template <class T, class W>
Status narrow_into(const std::string& name, const Typed& v, const char* dt, std::string* out) {
  const W lo = W(std::numeric_limits<T>::min()), hi = W(std::numeric_limits<T>::max());
  const W* in = reinterpret_cast<const W*>(v.data);
  out->resize(size_t(v.count) * sizeof(T));
  T* o = reinterpret_cast<T*>(out->data());
  for (int j = 0; j < v.count; ++j) {
    if (in[j] < lo || in[j] > hi) {
      out->clear();
      return bad("input '" + name + "': values in contents." + v.member + " out of range for " +
                 dt + " [" + std::to_string(int64_t(lo)) + ", " + std::to_string(int64_t(hi)) +
                 "]");
    }
    o[j] = T(in[j]);
  }
  return Status::OK;
}

// Checks request input i's typed contents against its tensor (count values of sp's datatype)
// and narrows them when the wire's elements are wider than the tensor's.
Status check_typed(Pending* p, int i, const TensorSpec& sp, int64_t count) {
  const auto& t = p->req->inputs(i);
  const Typed v = typed(t.contents(), sp.dt.cfg);
  if (v.member == nullptr)
    return bad("input '" + t.name() + "': datatype " + sp.dt.v2 +
               " has no typed contents field; send it in raw_input_contents");
  if (v.count != count) {
    std::string_view other;
    for (const auto& [m, size] : member_sizes(t.contents()))
      if (size && m != v.member && other.empty()) other = m;
    if (v.count == 0 && !other.empty())
      return bad("input '" + t.name() + "': datatype " + sp.dt.v2 + " takes its values in contents." +
                 v.member + ", got contents." + std::string(other));
    return bad("input '" + t.name() + "': expected " + std::to_string(count) +
               " values in contents." + v.member + " for shape " +
               fmt_shape(t.shape().data(), t.shape_size()) + ", got " + std::to_string(v.count));
  }
  if (v.wire == sp.dt.size) return Status::OK;  // read in place
  if (p->narrowed.size() < size_t(p->req->inputs_size())) p->narrowed.resize(p->req->inputs_size());
  std::string* out = &p->narrowed[i];
  switch (sp.dt.cfg) {
    case pb::TYPE_INT8: return narrow_into<int8_t, int32_t>(t.name(), v, sp.dt.v2, out);
    case pb::TYPE_INT16: return narrow_into<int16_t, int32_t>(t.name(), v, sp.dt.v2, out);
    case pb::TYPE_UINT8: return narrow_into<uint8_t, uint32_t>(t.name(), v, sp.dt.v2, out);
    case pb::TYPE_UINT16: return narrow_into<uint16_t, uint32_t>(t.name(), v, sp.dt.v2, out);
    default:
      return Status(StatusCode::INTERNAL, "input '" + t.name() + "': no narrowing from " +
                                              v.member + " to " + sp.dt.v2);
  }
}

}  // namespace

void Hist::observe(double v) {
  size_t i = std::lower_bound(bounds->begin(), bounds->end(), v) - bounds->begin();  // v <= le
  counts[i]++;
  sum += v;
  count++;
}

ModelVersion::ModelVersion(Ort::Env& env, const VersionPlan& plan,
                           const std::vector<double>* latency, const std::vector<double>* sizes)
    : plan_(plan) {
  if (plan_.instances < 1) plan_.instances = 1;
  if (plan_.max_combined <= 0) plan_.max_combined = plan_.max_batch_size > 0 ? plan_.max_batch_size : 1;
  if (plan_.max_queue_size < 1) plan_.max_queue_size = 1;
  combine_target_ = plan_.max_combined;
  for (int64_t p : plan_.preferred)
    if (p > 0) combine_target_ = std::min(combine_target_, p);
  stats_.model = plan_.name;
  stats_.version = plan_.version;
  stats_.init(latency, sizes);

  // The Python server's frozen session settings (bnserve/server/model.py).
  Ort::SessionOptions so;
  so.SetIntraOpNumThreads(1);
  so.SetInterOpNumThreads(1);
  so.SetExecutionMode(ORT_SEQUENTIAL);
  so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  so.EnableCpuMemArena();
  slots_.resize(plan_.instances);
  for (Slot& slot : slots_) slot.session = std::make_unique<Ort::Session>(env, plan_.path.c_str(), so);
  shrink_.AddConfigEntry("memory.enable_memory_arena_shrinkage", "cpu:0");
  Ort::Session& s = *slots_[0].session;
  Ort::AllocatorWithDefaultOptions alloc;
  for (size_t i = 0; i < s.GetInputCount(); ++i)
    inputs_.push_back(spec(s.GetInputNameAllocated(i, alloc).get(), s.GetInputTypeInfo(i)));
  for (size_t i = 0; i < s.GetOutputCount(); ++i)
    outputs_.push_back(spec(s.GetOutputNameAllocated(i, alloc).get(), s.GetOutputTypeInfo(i)));
  for (auto& t : inputs_) in_names_.push_back(t.name.c_str());
  for (auto& t : outputs_) out_names_.push_back(t.name.c_str());
  for (auto& t : inputs_) names_ += (names_.empty() ? "'" : ", '") + t.name + "'";
  for (Slot& slot : slots_) {
    slot.bufs.resize(inputs_.size());
    free_.push_back(&slot);
  }
}

ModelVersion::~ModelVersion() { stop(); }

Status ModelVersion::validate(Pending* p) const {
  const pb::ModelInferRequest& req = *p->req;
  const int64_t max_batch = plan_.max_batch_size;
  const int n = req.inputs_size();
  const int n_raw = int(p->raw.entries.size());
  if (n_raw && n_raw != n)
    return bad("request has " + std::to_string(n) + " inputs but " + std::to_string(n_raw) +
               " raw_input_contents entries; raw_input_contents needs exactly one entry per "
               "input, in order");
  if (n != (int)inputs_.size())
    return bad("expected " + std::to_string(inputs_.size()) + " input(s) " + names_ + ", got " +
               std::to_string(n));
  p->slot.assign(inputs_.size(), -1);
  p->narrowed.clear();
  int64_t batch = -1;
  size_t in_bytes = 0;
  for (int i = 0; i < n; ++i) {
    const auto& t = req.inputs(i);
    int k = -1;
    for (size_t j = 0; j < inputs_.size(); ++j)
      if (inputs_[j].name == t.name()) k = (int)j;
    if (k < 0) return bad("unknown input '" + t.name() + "'; this model's inputs are " + names_);
    if (p->slot[k] >= 0) return bad("input '" + t.name() + "' appears more than once in the request");
    p->slot[k] = i;
    const TensorSpec& sp = inputs_[k];
    if (t.datatype() != sp.dt.v2)
      return bad("input '" + t.name() + "': expected datatype " + sp.dt.v2 + ", got " +
                 (t.datatype().empty() ? std::string("(empty)") : t.datatype()));
    if (t.shape_size() != (int)sp.shape.size())
      return bad("input '" + t.name() + "': expected rank " + std::to_string(sp.shape.size()) +
                 " (shape " + fmt_shape(sp.shape) + "), got rank " +
                 std::to_string(t.shape_size()) + " (shape " +
                 fmt_shape(t.shape().data(), t.shape_size()) + ")");
    int64_t count = 1;
    for (int a = 0; a < t.shape_size(); ++a) {
      int64_t d = t.shape(a);
      if (d <= 0)
        return bad("input '" + t.name() + "': dimension " + std::to_string(a) + " of shape " +
                   fmt_shape(t.shape().data(), t.shape_size()) + " is " + std::to_string(d) +
                   "; every dimension must be at least 1");
      if (a == 0 && max_batch > 0) {
        if (d > max_batch)
          return bad("input '" + t.name() + "': batch of " + std::to_string(d) +
                     " rows exceeds max_batch_size " + std::to_string(max_batch));
      } else if (sp.shape[a] != -1 && d != sp.shape[a]) {
        std::string got = fmt_shape(t.shape().data(), t.shape_size());
        return bad("input '" + t.name() + "': expected shape " + fmt_shape(sp.shape) + ", got " +
                   got + " (dimension " + std::to_string(a) + " is " + std::to_string(d) +
                   ", expected " + std::to_string(sp.shape[a]) + ")");
      }
      if (d > (int64_t(1) << 31) / count)
        return bad("input '" + t.name() + "': shape " +
                   fmt_shape(t.shape().data(), t.shape_size()) + " is too large");
      count *= d;
    }
    int64_t rows = t.shape_size() ? t.shape(0) : 1;
    if (batch < 0) batch = rows;
    else if (rows != batch)
      return bad("inputs disagree on batch size: input '" + t.name() + "' has " +
                 std::to_string(rows) + " rows, another has " + std::to_string(batch));
    size_t nbytes = count * sp.dt.size;
    if (n_raw) {
      if (t.has_contents())
        return bad("input '" + t.name() + "' has typed contents while the request also carries "
                   "raw_input_contents; use one or the other for all inputs");
      const size_t got = p->raw.entries[i].size;
      if (got != nbytes)
        return bad("input '" + t.name() + "': expected " + std::to_string(nbytes) +
                   " bytes for shape " + fmt_shape(t.shape().data(), t.shape_size()) +
                   " and datatype " + sp.dt.v2 + ", got " + std::to_string(got));
    } else if (t.has_contents()) {
      Status st = check_typed(p, i, sp, count);
      if (!st.ok()) return st;
    } else {
      return bad("input '" + t.name() + "' has no data: neither raw_input_contents nor contents");
    }
    in_bytes += nbytes;
  }
  p->want.clear();
  if (req.outputs_size()) {
    for (const auto& o : req.outputs()) {
      int k = -1;
      for (size_t j = 0; j < outputs_.size(); ++j)
        if (outputs_[j].name == o.name()) k = (int)j;
      if (k < 0) return bad("unknown requested output '" + o.name() + "'");
      p->want.push_back(k);
    }
  } else {
    for (size_t j = 0; j < outputs_.size(); ++j) p->want.push_back((int)j);
  }
  p->rows = batch < 0 ? 1 : batch;
  p->in_bytes = in_bytes;
  return Status::OK;
}

Status ModelVersion::enqueue(Pending* p) {
  p->deadline = p->ctx->deadline();
  p->has_deadline = p->deadline != std::chrono::system_clock::time_point::max();
  if (p->has_deadline && p->deadline <= std::chrono::system_clock::now())
    return Status(StatusCode::DEADLINE_EXCEEDED, "deadline exceeded before the request was queued");
  Slot* slot = nullptr;  // set: run inline
  {
    std::lock_guard<std::mutex> g(mu_);
    // Inline only when a worker would run it at once too: nothing queued (no overtaking), a free
    // session, and no queue delay that would have it wait for companions.
    if (ewma_ns_ >= 0 && ewma_ns_ < kInlineNs && queue_.empty() && !free_.empty() && !stopping_ &&
        (plan_.delay_us <= 0 || running_locked() == 0)) {
      slot = free_.back();
      free_.pop_back();
      p->t_enq = now_ns();
    }
  }
  if (slot) {
    std::vector<Pending*> batch{p};
    int64_t ns = 0;
    if (p->ctx->IsCancelled()) {  // as a worker drops it (the deadline was checked above)
      p->dequeued = true;
      p->queue_ns = 0;
      p->done(Status(StatusCode::CANCELLED, "the client cancelled the request"));
    } else {
      ns = run_batch(*slot, batch);  // answers p
    }
    bool wake;
    {
      std::lock_guard<std::mutex> g(mu_);
      release_locked(slot, ns);
      wake = !queue_.empty();  // queued meanwhile: a worker takes it on this session
    }
    if (wake) cv_.notify_one();
    return Status::OK;
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    if ((int64_t)queue_.size() >= plan_.max_queue_size)
      return Status(StatusCode::UNAVAILABLE, "model '" + plan_.name + "' version " + plan_.version +
                                                 ": queue full (" + std::to_string(queue_.size()) +
                                                 " requests waiting); retry later");
    p->t_enq = now_ns();
    queue_.push_back(p);
    queued_rows_ += p->rows;
    stats_.queue_depth.store((int64_t)queue_.size(), std::memory_order_relaxed);
  }
  cv_.notify_one();
  return Status::OK;
}

bool ModelVersion::compatible(const Pending* a, const Pending* b) const {
  if (a->want != b->want) return false;
  for (size_t k = 0; k < inputs_.size(); ++k) {
    const auto& sa = a->req->inputs(a->slot[k]).shape();
    const auto& sb = b->req->inputs(b->slot[k]).shape();
    if (sa.size() != sb.size()) return false;
    for (int i = 1; i < sa.size(); ++i)
      if (sa.Get(i) != sb.Get(i)) return false;
  }
  return true;
}

void ModelVersion::start() {
  for (size_t i = 0; i < slots_.size(); ++i) {
    threads_.emplace_back([this] { worker(); });
    // Named by its creator, so it has its name before the server reports ready: the CPU spent
    // in onnxruntime runs is told from gRPC's by name in /proc/PID/task (bench/suite.py).
    pthread_setname_np(threads_.back().native_handle(), kWorkerThreadName);
  }
}

void ModelVersion::abort_queued(const Status& st) {
  std::deque<Pending*> dead;
  {
    std::lock_guard<std::mutex> g(mu_);
    dead.swap(queue_);
    queued_rows_ = 0;
    stats_.queue_depth.store(0, std::memory_order_relaxed);
  }
  for (Pending* p : dead) p->done(st);
}

void ModelVersion::stop() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
  threads_.clear();
}

void ModelVersion::release_locked(Slot* slot, int64_t ns) {
  free_.push_back(slot);
  if (ns > 0) ewma_ns_ = ewma_ns_ < 0 ? ns : ewma_ns_ + (ns - ewma_ns_) / 8;
  if (running_locked() == 0 && plan_.delay_us > 0) cv_.notify_all();  // waiters may go now
}

// As many workers as sessions: a free session always has an idle worker to run queued work
// (whoever frees one either is that worker, looping, or notifies one).
void ModelVersion::worker() {
  std::vector<Pending*> batch, dead;
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    if (queue_.empty() || free_.empty()) {
      if (stopping_ && queue_.empty()) return;
      cv_.wait(lk);
      continue;
    }
    // With a queue delay: while another batch runs and fewer rows than worth waiting for are
    // queued, wait (up to the delay after the oldest request's arrival) for more.
    if (plan_.delay_us > 0 && running_locked() > 0 && queued_rows_ < combine_target_ &&
        !stopping_) {
      int64_t until = queue_.front()->t_enq + plan_.delay_us * 1000;
      int64_t left = until - now_ns();
      if (left > 0) {
        cv_.wait_for(lk, std::chrono::nanoseconds(left));
        continue;
      }
    }
    // The oldest request plus compatible followers up to max_combined rows (a request with
    // more rows than that runs alone). Dead requests (deadline passed, client gone) are dropped.
    batch.clear();
    dead.clear();
    const auto now_sys = std::chrono::system_clock::now();
    int64_t rows = 0;
    const bool combine = plan_.max_batch_size > 0;
    for (auto it = queue_.begin(); it != queue_.end();) {
      Pending* p = *it;
      bool take;
      if (batch.empty()) take = true;
      else take = combine && rows + p->rows <= plan_.max_combined && compatible(batch[0], p);
      if (take && ((p->has_deadline && now_sys >= p->deadline) || p->ctx->IsCancelled())) {
        dead.push_back(p);
        queued_rows_ -= p->rows;
        it = queue_.erase(it);
        continue;
      }
      if (take) {
        batch.push_back(p);
        rows += p->rows;
        queued_rows_ -= p->rows;
        it = queue_.erase(it);
        if (rows >= plan_.max_combined) break;
      } else {
        ++it;
      }
    }
    stats_.queue_depth.store((int64_t)queue_.size(), std::memory_order_relaxed);
    Slot* slot = nullptr;
    if (!batch.empty()) {
      slot = free_.back();
      free_.pop_back();
    }
    lk.unlock();
    const int64_t t = now_ns();
    for (Pending* p : dead) {
      p->dequeued = true;
      p->queue_ns = t - p->t_enq;
      if (p->has_deadline && now_sys >= p->deadline)
        p->done(Status(StatusCode::DEADLINE_EXCEEDED, "deadline exceeded while queued"));
      else
        p->done(Status(StatusCode::CANCELLED, "the client cancelled the request"));
    }
    const int64_t ns = slot ? run_batch(*slot, batch) : 0;
    lk.lock();
    if (slot) release_locked(slot, ns);
  }
}

int64_t ModelVersion::run_batch(Slot& slot, std::vector<Pending*>& batch) {
  const int64_t t0 = now_ns();
  int64_t total_rows = 0;
  size_t total_bytes = 0;
  for (Pending* p : batch) {
    p->dequeued = true;
    p->queue_ns = t0 - p->t_enq;
    total_rows += p->rows;
    total_bytes += p->in_bytes;
  }
  int64_t t1 = t0, t2 = t0;
  Status st;
  // Whatever goes wrong, every request of the batch gets an answer and the worker goes on.
  try {
    st = compute(slot, batch, total_rows, total_bytes, &t1, &t2);
  } catch (const Ort::Exception& e) {
    st = Status(StatusCode::INTERNAL, std::string("onnxruntime: ") + e.what());
  } catch (const std::exception& e) {
    st = Status(StatusCode::INTERNAL, std::string("internal error: ") + e.what());
  }
  if (t2 < t1) t2 = t1;
  // A merge buffer that grew past the threshold is not kept (as the Python server's arena).
  for (auto& buf : slot.bufs)
    if (buf.capacity() > kShrinkInputBytes) std::vector<char>().swap(buf);
  const int64_t t3 = now_ns();
  for (Pending* p : batch) {
    p->cin_ns = t1 - t0;
    p->cinfer_ns = t2 - t1;
    p->cout_ns = t3 - t2;
  }
  {
    std::lock_guard<std::mutex> g(stats_.mu);
    stats_.execution_count++;
    if (st.ok()) stats_.inference_count += total_rows;
    stats_.last_ms = wall_ms();
    stats_.batch_size.observe(double(total_rows));
    stats_.batch_requests.observe(double(batch.size()));
    stats_.compute_s.observe(double(t3 - t0) * 1e-9);
  }
  for (Pending* p : batch) p->done(st);
  return t3 - t0;
}

Status ModelVersion::compute(Slot& slot, std::vector<Pending*>& batch, int64_t total_rows,
                             size_t total_bytes, int64_t* t1, int64_t* t2) {
  Ort::Session& session = *slot.session;
  static const Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  const Pending* first = batch[0];
  const size_t nin = inputs_.size();
  std::vector<Ort::Value> values;
  values.reserve(nin);
  std::vector<int64_t> shape;
  for (size_t k = 0; k < nin; ++k) {
    const auto& t = first->req->inputs(first->slot[k]);
    size_t nbytes;
    const char* data = input_bytes(*first, first->slot[k], inputs_[k].dt, &nbytes);
    // One request: onnxruntime reads its bytes where they are when they are in one piece and
    // aligned as malloc's are (a piece of gRPC's slices starts anywhere); else they are copied,
    // so no run reads a tensor at an address less aligned than before.
    if (batch.size() == 1 && data != nullptr &&
        reinterpret_cast<uintptr_t>(data) % alignof(std::max_align_t) == 0) {
      values.push_back(Ort::Value::CreateTensor(mem, const_cast<char*>(data), nbytes,
                                                t.shape().data(), t.shape_size(),
                                                inputs_[k].dt.ort));
      continue;
    }
    std::vector<char>& buf = slot.bufs[k];
    size_t need = 0;
    for (Pending* p : batch) {
      size_t n;
      input_bytes(*p, p->slot[k], inputs_[k].dt, &n);
      need += n;
    }
    buf.resize(need);
    size_t off = 0;
    for (Pending* p : batch) off += copy_input(*p, p->slot[k], inputs_[k].dt, buf.data() + off);
    shape.assign(t.shape().begin(), t.shape().end());
    shape[0] = total_rows;
    values.push_back(Ort::Value::CreateTensor(mem, buf.data(), buf.size(), shape.data(),
                                              shape.size(), inputs_[k].dt.ort));
  }
  std::vector<const char*> names;
  for (int k : first->want) names.push_back(out_names_[k]);
  *t1 = now_ns();
  std::vector<Ort::Value> outs =
      session.Run(total_bytes > kShrinkInputBytes ? shrink_ : plain_, in_names_.data(),
                  values.data(), values.size(), names.data(), names.size());
  *t2 = now_ns();
  // Split the outputs back by rows: each request gets exactly its rows.
  for (size_t i = 0; i < names.size(); ++i) {
    auto info = outs[i].GetTensorTypeAndShapeInfo();
    auto oshape = info.GetShape();
    if (batch.size() > 1 && (oshape.empty() || oshape[0] != total_rows))
      return Status(StatusCode::INTERNAL, "output '" + outputs_[first->want[i]].name +
                                              "' has shape " + fmt_shape(oshape) +
                                              ", which cannot be split into a batch of " +
                                              std::to_string(total_rows) + " rows");
  }
  for (Pending* p : batch) {
    p->resp->set_model_name(plan_.name);
    p->resp->set_model_version(plan_.version);
    p->resp->set_id(p->req->id());
  }
  for (size_t i = 0; i < names.size(); ++i) {
    const TensorSpec& sp = outputs_[first->want[i]];
    auto info = outs[i].GetTensorTypeAndShapeInfo();
    auto oshape = info.GetShape();
    const size_t nbytes = info.GetElementCount() * sp.dt.size;
    const char* data = static_cast<const char*>(outs[i].GetTensorRawData());
    const size_t row_bytes = batch.size() > 1 ? nbytes / size_t(total_rows) : 0;
    size_t off = 0;
    for (Pending* p : batch) {
      auto* o = p->resp->add_outputs();
      o->set_name(sp.name);
      o->set_datatype(sp.dt.v2);
      if (batch.size() == 1) {
        for (int64_t d : oshape) o->add_shape(d);
        p->resp->add_raw_output_contents()->assign(data, nbytes);
      } else {
        o->add_shape(p->rows);
        for (size_t a = 1; a < oshape.size(); ++a) o->add_shape(oshape[a]);
        const size_t n = row_bytes * size_t(p->rows);
        p->resp->add_raw_output_contents()->assign(data + off, n);
        off += n;
      }
    }
  }
  return Status::OK;
}

}  // namespace bnn
