"""runtime_py: sessions over an artifact, KV buffers and the generation loop. Never imports export."""
