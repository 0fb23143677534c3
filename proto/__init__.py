"""Open Inference Protocol messages and service stubs (generated from inference.proto)."""
