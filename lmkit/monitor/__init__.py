"""Observers of training events: run-directory writers and terminal renderers."""
