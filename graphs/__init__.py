"""graphs: passes over the exporter's ``onnx_ir`` graph that fuse attention/MoE/norms and lower them per target
(ort, trt-plugin, trt-native), fold constants and quantize weights. onnx_ir rather than onnx-graphsurgeon: its lazy
initializers keep the weights on disk until the graph is written (graphs/fuse.py)."""
