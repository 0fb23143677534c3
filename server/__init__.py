"""The inference server: onnxruntime sessions behind the Open Inference Protocol over gRPC."""
