"""Standalone tools for users of trained spingen models (no loop, no param.json needed)."""
