"""artifacts: the bundle format (manifest.json + files) and the Triton repository writer."""
