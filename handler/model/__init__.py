"""The model layer: architectures, loading a model's files (and zoo folders), preparing it for inference, precision, int8, the runner, top-k."""
