"""A worker rank: model weights, KV cache, forward passes and sampling."""
