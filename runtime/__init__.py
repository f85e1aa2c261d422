"""KV caches, sampling, generation loops."""
