"""What composes the model and the quantization methods into a working tool: the Python API (api), build on
first use (first_use), the build driver (quantize_model), calibration and smoothing, the tag registry (tags),
perplexity and LoRA training.

It sits above both model.py / the method files and runtime/, and imports them; runtime/ imports nothing from
here. Importing runtime first sets its thread defaults before NumPy and Numba load (runtime/__init__.py).
"""
import runtime  # noqa: F401
