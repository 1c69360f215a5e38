"""The HF-transformers oracle of SparseMM generation (batch size 1, CPU-friendly)."""
