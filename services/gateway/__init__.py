"""The gateway: fmaas gRPC API, validation, tokenizer-pool routing, health and metrics."""
