"""Kubernetes: the renderer of the KubeRay manifests, with its Prometheus assets as package data."""
