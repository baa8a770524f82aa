"""sherry-export: ternary LLM weights packed for fast CPU inference through ONNX and onnxruntime."""

from sherry_export.runtime import get_library_path

__all__ = ["get_library_path"]
