"""The Kubernetes controller for SandboxTask objects."""
