"""Test harness: an emulated Kubernetes API server and a test kubelet that runs pods locally."""
