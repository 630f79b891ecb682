"""Exporters: the avatar for other splat viewers, engines and VR (see exporter.py)."""
