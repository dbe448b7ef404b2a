"""mergebuild: a build system for weight-space model merges."""

__version__ = "0.1.0"
