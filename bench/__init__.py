"""Load generator and transformers baseline for measuring the server (`tgis-bench`)."""
