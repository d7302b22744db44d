"""Shipped presets (YAML). Loaded by name with ``--preset NAME``; see lmkit.config."""
