"""Conformance of mergebuild against mergekit 0.1.5, used strictly as an oracle."""
