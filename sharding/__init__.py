"""Meshes and partition rules (tensor parallelism arrives with the sharding issue)."""
