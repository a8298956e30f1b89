"""jrcl_fast: JRCL training for long-tailed image classification."""

__version__ = "0.1.0"
