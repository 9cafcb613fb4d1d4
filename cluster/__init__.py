"""Cluster files (launcher YAML, KubeRay manifests, runtime_env) and a local-cluster helper."""
