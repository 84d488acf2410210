"""Real pods on this machine: images built locally and a kind cluster (see README.md)."""
