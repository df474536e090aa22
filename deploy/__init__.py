"""Serving and cluster manifests for promoted adapters (filled in by the serving issue)."""
