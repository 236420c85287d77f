"""The scheduler: request queue, continuous batching and stop conditions."""
