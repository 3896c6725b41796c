"""The GGUF format layer: the strict reader, the model config and its tensor names."""
