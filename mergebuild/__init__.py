"""mergebuild: a build system for weight-space model merges."""

import warnings

# torch warns at import when NumPy is absent; mergebuild never converts to NumPy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

__version__ = "0.1.0"
