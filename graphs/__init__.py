"""graphs: onnx-graphsurgeon passes that fuse attention/MoE and lower per target (ort, trt-plugin, trt-native)."""
