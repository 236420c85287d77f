"""A TGIS-compatible inference server as a ZeroMQ pipeline: gateway, tokenizer pool, scheduler, workers."""
