"""Integrations with other libraries; each module imports its library lazily or on import
and needs the matching extra (``chancy[django]``, ``chancy[otel]``)."""
