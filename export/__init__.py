"""export: checkpoint -> ModelSpec -> torch decoder -> ONNX -> passes -> engine. See ../shared/DESIGN.md."""
