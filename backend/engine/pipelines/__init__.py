"""Generation pipelines: one module per job kind, readable top to bottom."""
