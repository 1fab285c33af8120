"""Packed weight formats, found by the name a saved model's metadata gives them.

Each format's module is imported only when a model uses it.
"""
import importlib

from runtime.errors import UserError

FORMAT_CLASSES = {"uniform": "runtime.formats.uniform.UniformTensor",
                  "lut4": "runtime.formats.lut4.Lut4Tensor",
                  "int8": "runtime.formats.int8.Int8Tensor",
                  "sparse": "runtime.formats.sparse.SparseTensor",
                  "spqr": "runtime.formats.spqr.SpQRTensor",
                  "incoherent": "runtime.formats.incoherent.IncoherentTensor",
                  "e8p": "runtime.formats.e8p.E8PTensor"}


def format_class(name: str):
    """The PackedTensor subclass of format `name`; UserError for an unknown one."""
    if name not in FORMAT_CLASSES:
        raise UserError(f"unknown packed format {name!r} (known: {', '.join(FORMAT_CLASSES)}); "
                        f"re-quantize the model with this version")
    module, _, cls = FORMAT_CLASSES[name].rpartition(".")
    return getattr(importlib.import_module(module), cls)
