"""Dataset files and rows: reading within bounds, formats, validation, prompts (both planes)."""
