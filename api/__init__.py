"""AUTOMATIC1111-compatible HTTP API (FastAPI), served by the app process."""
