"""Storage backends: one module per backend, each with a ``StorageBackend`` class."""

BACKENDS = ("localhost", "aws_s3")
