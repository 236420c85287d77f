"""The `tgis_native` model implementations: a registry of families wired from shared layers (see registry.py)."""
