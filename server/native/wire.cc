// See wire.h.
#include "wire.h"

#include <google/protobuf/io/coded_stream.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

namespace bnn {
namespace {

// A cursor over a message's received slices.
class Reader {
 public:
  explicit Reader(const std::vector<grpc::Slice>& s) : s_(s) { skip_empty(); }
  bool done() const { return i_ == s_.size(); }

  bool varint(uint64_t* v) {  // base-128, least significant group first; at most 10 bytes
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (done()) return false;
      const uint8_t b = s_[i_].begin()[off_];
      advance(1);
      *v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return true;
    }
    return false;
  }

  // The next n bytes, in pieces as they lie in the slices: fn(std::string_view) for each.
  // False when fewer are left.
  template <class F>
  bool each(size_t n, F fn) {
    while (n > 0) {
      if (done()) return false;
      const size_t m = std::min(n, s_[i_].size() - off_);
      fn(std::string_view(reinterpret_cast<const char*>(s_[i_].begin()) + off_, m));
      advance(m);
      n -= m;
    }
    return true;
  }

 private:
  void advance(size_t n) {  // n <= what is left of the current slice
    off_ += n;
    skip_empty();
  }
  void skip_empty() {
    while (i_ < s_.size() && off_ == s_[i_].size()) {
      ++i_;
      off_ = 0;
    }
  }
  const std::vector<grpc::Slice>& s_;
  size_t i_ = 0, off_ = 0;
};

void put_varint(std::string* out, uint64_t v) {
  uint8_t buf[10];  // a varint of 64 bits takes at most 10 bytes
  const uint8_t* end = google::protobuf::io::CodedOutputStream::WriteVarint64ToArray(v, buf);
  out->append(reinterpret_cast<const char*>(buf), size_t(end - buf));
}

constexpr uint64_t kLengthDelimited = 2;  // wire type
constexpr uint64_t kRawField = inference::ModelInferRequest::kRawInputContentsFieldNumber;

}  // namespace

size_t RawEntry::copy_to(char* dst) const {
  for (std::string_view v : pieces) {
    std::memcpy(dst, v.data(), v.size());
    dst += v.size();
  }
  return size;
}

void RawInputs::own(size_t total) {
  owned.resize(total);
  size_t off = 0;
  for (RawEntry& e : entries) {
    const size_t n = e.copy_to(owned.data() + off);
    e.pieces.assign(1, std::string_view(owned.data() + off, n));
    off += n;
  }
  slices.clear();
}

Scan scan_infer_request(const grpc::ByteBuffer& in, inference::ModelInferRequest* msg,
                        RawInputs* raw) {
  raw->clear();
  if (!in.Valid() || !in.Dump(&raw->slices).ok()) return Scan::kNotPlain;
  Reader r(raw->slices);
  std::string rest;  // every field but raw_input_contents, re-encoded for protobuf
  size_t total = 0;  // raw_input_contents bytes
  while (!r.done()) {
    uint64_t tag, len;
    // Every field of ModelInferRequest is length-delimited (strings, messages, the parameters
    // map, bytes); anything else is protobuf's to judge.
    if (!r.varint(&tag) || (tag & 7) != kLengthDelimited || (tag >> 3) == 0 || !r.varint(&len) ||
        len > uint64_t(INT32_MAX))
      return Scan::kNotPlain;
    if ((tag >> 3) == kRawField) {
      RawEntry& e = raw->entries.emplace_back();
      if (!r.each(size_t(len), [&e](std::string_view v) { e.add(v); })) return Scan::kNotPlain;
      total += e.size;
      continue;
    }
    put_varint(&rest, tag);  // a small field: copied
    put_varint(&rest, len);
    if (!r.each(size_t(len), [&rest](std::string_view v) { rest.append(v); }))
      return Scan::kNotPlain;
  }
  // The whole message would parse exactly when these fields do (the entries are plain bytes).
  if (!msg->ParseFromString(rest)) return Scan::kInvalid;
  if (total < kOwnBelow) raw->own(total);
  return Scan::kParsed;
}

}  // namespace bnn
