"""Export: trained ternary models to ONNX with the ai.sherry ops (``export_llm`` for causal LMs)."""

from sherry_export.export.llama import ExportOptions, build_decoder
from sherry_export.export.llm import ExportResult, export_llm

__all__ = ["ExportOptions", "ExportResult", "build_decoder", "export_llm"]
