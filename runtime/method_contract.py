"""What a quantization method declares about itself, and what a parsed tag holds.

Each method file states its contract once, as `CONTRACTS` (MethodContract):
its tag letters, bit widths, options with their defaults, its parameters and
whether it needs calibration. These types sit in runtime/ so that the method
files, which build on runtime/, can declare themselves; the registry that lists
the methods and the tag parser that reads the declarations sit above both, in
pipeline/tags.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Option:
    """One option of a method's tag: a switch written as a word ("sym"), or a letter followed by a
    number ("s3"), the number being the value of quantize.py's flag times `scale`."""
    name: str  # as written in the tag
    flag: str  # quantize.py's flag
    help: str  # what it does
    field: str = ""  # numbers: the parameters field it sets, whose default the help states
    scale: int = 0  # numbers: tag number = flag value * scale (t: hundredths); 0: a switch


@dataclass(frozen=True)
class MethodContract:
    """What a method accepts, declared once in its own file (`CONTRACTS`)."""
    name: str  # the tag's METHOD letters
    summary: str  # one line: what it is
    bits: tuple  # the BITS it supports
    params: Callable  # QuantSpec -> the method's parameters dataclass (UserError on conflicting parts)
    quantize: Callable  # no calibration: (W, params) -> packed; "hessian": (weights, H, params) -> [(packed, stats)]
    examples: tuple  # tags, for the messages that list the valid ones
    options: tuple = ()  # Option, in the order the tag writes them
    group_multiple: int = 0  # a GROUP must be a multiple of this; 0: takes no group size
    group_field: str = ""  # the parameters field GROUP sets, whose default the help states
    calibration: str = ""  # the data it needs: "", "hessian" (pipeline/calibration.py) or "activations"
    #                         (pipeline/smoothing.py)

    def spec(self, bits: int, group_size: int = 0, options=(), values=None) -> QuantSpec:
        """The spec of this method with these settings, writing its options in the declared order."""
        return QuantSpec(self.name, bits, group_size, set(options), dict(values or {}),
                         tuple(o.name for o in self.options))

    def defaults(self):
        """The parameters of the bare tag (the method at its first width, nothing else given)."""
        return self.params(self.spec(self.bits[0]))


@dataclass
class QuantSpec:
    """A parsed tag: the method and the settings it was asked for."""
    method: str
    bits: int
    group_size: int = 0          # 0 = absent
    options: set = field(default_factory=set)
    values: dict = field(default_factory=dict)  # numeric options, e.g. {"s": 3, "t": 20}
    order: tuple = field(default=(), compare=False, repr=False)  # option names in the order the tag writes them

    @property
    def tag(self) -> str:
        rank = {name: i for i, name in enumerate(self.order)}

        def order(name):
            return rank.get(name, len(rank)), name

        group = f"g{self.group_size}" if self.group_size else ""
        numbers = "".join(f"{k}{self.values[k]}" for k in sorted(self.values, key=order))
        return f"{self.method}{self.bits}{group}{''.join(sorted(self.options, key=order))}{numbers}"
