"""Algorithms that change the float model before quantization (SmoothQuant)."""
