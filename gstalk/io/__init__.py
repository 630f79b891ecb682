"""File input/output: atomic writes and media encoding."""
