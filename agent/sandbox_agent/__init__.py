"""The LLM-in-Sandbox runtime: the agent loop, its tools, the exec server and local sandboxes."""

__version__ = "0.1.0"
