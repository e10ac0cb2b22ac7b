"""The compression plan: :mod:`.schema` (dataclasses, no torch) and :mod:`.io` (plan.json + plan.safetensors).
The torch side (applying a plan to a model) is :mod:`qsvd_export.compress.apply_plan`."""
