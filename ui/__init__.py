"""Gradio front-end: one module per tab. Nothing here computes images; it calls `EaselService`."""
