"""The local sandbox backends' names, apart from their code: the command line lists them without
importing any backend."""

BACKEND_NAMES = ("auto", "bwrap", "docker", "process")
