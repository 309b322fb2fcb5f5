"""The torch-free core both processes share: request schemas and their checks, typed options with their defaults,
the sampler/schedule name catalog, infotext, the prompt parser, the image codec, data paths, flags and errors.

Nothing here imports torch, Gradio or the engine; the app (`backend/`, `ui/`, `api/`) and the engine
(`backend/engine/`) both build on it.
"""
