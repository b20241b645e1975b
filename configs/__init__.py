"""YAML presets and deployment configs, shipped as package data so an installed copy finds them."""
