"""qrobust."""
