"""Post-processing in the backend process: upscaler and face-restore networks, face detection, the device runtime."""
