"""Unit, conformance and end-to-end tests; end-to-end ones start the real processes."""
