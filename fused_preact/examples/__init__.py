"""Runnable examples (``python -m fused_preact.examples.train``)."""
