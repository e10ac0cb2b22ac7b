"""Architecture adapters: what the exporter and the compressor need to know about each model family."""

from qsvd_export.models.adapters import ArchAdapter, adapter_for_config, supported_model_types

__all__ = ["ArchAdapter", "adapter_for_config", "supported_model_types"]
