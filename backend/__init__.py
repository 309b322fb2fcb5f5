"""Easel backend: everything that touches models and the device. Never imports Gradio."""
