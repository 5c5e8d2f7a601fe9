"""Data: files and globs, tables and the tokenize-once cache, sampling and sharding, streaming, packing."""
