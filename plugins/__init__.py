"""plugins: one file per TensorRT plugin (spec, torch reference, kernels, registration). Never imports export."""
