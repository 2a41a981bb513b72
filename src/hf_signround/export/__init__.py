"""Other checkpoint layouts for serving engines: GPTQ v1 (``export_gptq``)."""

from .gptq import GPTQExport, export_gptq

__all__ = ["GPTQExport", "export_gptq"]
