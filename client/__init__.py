"""Python client for the Open Inference Protocol: unary and streaming, numpy in and out."""
