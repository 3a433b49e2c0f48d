"""Turn RefineDet checkpoints into deployable artifacts: ONNX, TensorRT engines, Triton repositories."""
