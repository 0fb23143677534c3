// Reading a ModelInferRequest without copying its tensors.
//
// protobuf (3.21) copies every bytes field out of gRPC's received slices: a vol3d volume
// (128 KiB) was copied once on the queue's thread, then again by the worker into its batch. Here
// the request's top-level fields are scanned by hand (the wire format: tag, length, bytes):
// each raw_input_contents entry becomes the list of its pieces in the received slices (gRPC
// reads a connection into 64 KiB slices, so a volume lies in two or three), which the worker
// copies straight into the batch it runs (a request under 64 KiB is copied on arrival instead:
// RawInputs::own); every other field (names, shapes, parameters: a few hundred bytes) is parsed
// by protobuf as usual. Written by hand because protobuf has no
// aliasing parse for bytes fields; anything but the plain shape of a request is left to protobuf.
#pragma once

#include <grpcpp/grpcpp.h>

#include <string>
#include <string_view>
#include <vector>

#include "inference.pb.h"

namespace bnn {

// One raw_input_contents entry: its bytes, in order, in one piece or several.
struct RawEntry {
  size_t size = 0;
  std::vector<std::string_view> pieces;
  void add(std::string_view v) {
    pieces.push_back(v);
    size += v.size();
  }
  // Its bytes into dst (size of them); returns the size.
  size_t copy_to(char* dst) const;
};

// A request's raw_input_contents entries, wherever their bytes are.
struct RawInputs {
  std::vector<RawEntry> entries;    // entry i
  std::vector<grpc::Slice> slices;  // the received bytes the entries point into (held here)
  std::string owned;                // or a copy of them (own())
  void clear() {
    entries.clear();
    slices.clear();
    owned.clear();
  }
  // Copies the entries' bytes (`total` of them) into `owned` and lets go of the slices. For a
  // small request: a piece of a slice holds the whole 64 KiB slice, so a queued 256-byte request
  // would keep 64 KiB.
  void own(size_t total);
};

// Below this many raw bytes a request's entries are copied on arrival (RawInputs::own): less
// than one of gRPC's 64 KiB receive slices.
constexpr size_t kOwnBelow = 64 * 1024;

enum class Scan {
  kParsed,    // *msg and *raw hold the request
  kNotPlain,  // not the plain shape of a request: parse it with protobuf as a whole
  kInvalid,   // the fields other than raw_input_contents do not parse: neither would the whole
};

// Parses `in` into *msg, except its raw_input_contents entries, which go to *raw as pieces of
// the received slices (msg then has none). kNotPlain when the scan cannot vouch for the bytes:
// a top-level field that is not length-delimited, or a length past the end; the caller then
// parses the message with protobuf, which also says what was wrong when the bytes are not a
// request at all. *raw is cleared first and may be left partly filled unless kParsed.
Scan scan_infer_request(const grpc::ByteBuffer& in, inference::ModelInferRequest* msg,
                        RawInputs* raw);

}  // namespace bnn
