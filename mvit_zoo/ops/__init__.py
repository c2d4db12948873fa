"""Accelerated implementations of the model's operations, behind one dispatch."""
