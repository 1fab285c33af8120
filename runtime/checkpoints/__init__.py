"""Model files in and out: checkpoints of every supported layout read as HF-named tensors (safetensors, PyTorch
pickles, GGUF, llama2.c), this project's packed models saved and loaded with content checksums, atomic writes,
and the ecosystem's quantized layouts imported (importers/) and exported (export/)."""
