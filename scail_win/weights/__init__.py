"""Checkpoint I/O: formats, integrity checks, conversion, prefetch and LoRA files."""
