"""Data: preprocessing into Megatron indexed datasets, and the bundled default corpus."""
