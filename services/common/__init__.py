"""What every service shares: the wire protocol and codec, ZeroMQ helpers, config, logging, model paths."""
