"""The tag grammar: how a quantized model's name says what was done to it.

A quantized model is named `BASE.TAG`, e.g. `smollm2-135m.rtn4g128`:

    TAG     = METHOD BITS [ "g" GROUP ] { OPTION }  |  SHORT
    OPTION  = WORD | LETTER NUMBER                   e.g. "sym", "s3"
    SHORT   = q2 | q3 | q4                           the best method at that width (ALIASES)

Which METHOD letters exist, their BITS, whether and how they take a GROUP,
their OPTIONs and their defaults is not written here: each method file
declares it once, as `CONTRACTS` (MethodContract), and METHOD_MODULES lists
those files. The parser, the build driver (runtime/quantize_model.py) and
quantize.py's help loop over the declarations. runtime/ never imports the
method files when it is imported: `contracts()` imports them on first use.

A tag is a request: the saved model's config.json records the method and its
parameters, and that record, never the name, is what the loader trusts.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Callable

from runtime.errors import UserError

METHOD_MODULES = (
    "rtn",        # round-to-nearest
    "gptq",       # GPTQ
    "spqr",       # SpQR
    "quip",       # QuIP
    "quipsharp",  # QuIP#
    "nf4",        # NF4 / FP4 of QLoRA
    "int8",       # LLM.int8, absmax W8A8, SmoothQuant
)
ALIASES = {"q2": "quipsharp2", "q3": "quipsharp3", "q4": "quipsharp4"}  # why these: README, "Short tags"


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
    calibration: str = ""  # the data it needs: "", "hessian" (runtime/calibration.py) or "activations"
    #                         (runtime/smoothing.py)

    def defaults(self):
        """The parameters of the bare tag (the method at its first width, nothing else given)."""
        return self.params(QuantSpec(self.name, self.bits[0]))


def contracts() -> dict:
    """{METHOD letters: MethodContract} of every method module, imported here on first use."""
    return {c.name: c for module in METHOD_MODULES for c in importlib.import_module(module).CONTRACTS}


@dataclass
class QuantSpec:
    """A parsed tag: the method and the settings it was asked for."""
    method: str
    bits: int
    group_size: int = 0          # 0 = absent
    options: set = field(default_factory=set)
    values: dict = field(default_factory=dict)  # numeric options, e.g. {"s": 3, "t": 20}

    @property
    def tag(self) -> str:
        contract = contracts().get(self.method)
        rank = {o.name: i for i, o in enumerate(contract.options if contract else ())}

        def order(name):
            return rank.get(name, len(rank)), name

        group = f"g{self.group_size}" if self.group_size else ""
        numbers = "".join(f"{k}{self.values[k]}" for k in sorted(self.values, key=order))
        return f"{self.method}{self.bits}{group}{''.join(sorted(self.options, key=order))}{numbers}"


def tag_forms() -> str:
    """The valid tag forms, with examples, for messages."""
    known = contracts().values()
    words = dict.fromkeys(o.name for c in known for o in c.options if not o.scale)
    letters = dict.fromkeys(f"{o.name}N" for c in known for o in c.options if o.scale)
    examples = ", ".join(e for c in known for e in c.examples)
    return (f"METHOD BITS [gGROUP] [{'|'.join([*words, *letters])}] with METHOD one of "
            f"{', '.join(c.name for c in known)}, or a short tag {', '.join(ALIASES)} "
            f"(e.g. {examples}, {', '.join(ALIASES)})")


def parse_tag(tag: str) -> QuantSpec:
    """The spec a tag stands for; UserError listing the valid forms otherwise."""
    if not tag:
        raise UserError(f"the quantization tag is empty: valid tags are {tag_forms()}")
    if tag.startswith("q") and tag[1:].isdigit():
        if tag not in ALIASES:
            raise UserError(f"unknown short tag {tag!r}: the short tags are {', '.join(ALIASES)}")
        return parse_tag(ALIASES[tag])
    known = contracts()
    words = "|".join(dict.fromkeys(o.name for c in known.values() for o in c.options if not o.scale))
    letters = "".join(dict.fromkeys(o.name for c in known.values() for o in c.options if o.scale))
    option = f"{words}|[{letters}]\\d+"
    match = re.match(rf"^(?P<method>[a-z]+?)(?P<bits>\d+)(?:g(?P<group>\d+))?(?P<options>(?:{option})*)$", tag)
    if not match or match["method"] not in known:
        raise UserError(f"unknown quantization tag {tag!r}: valid tags are {tag_forms()}")
    contract, bits = known[match["method"]], int(match["bits"])
    if bits not in contract.bits:
        raise UserError(f"tag {tag!r}: {contract.name} supports {', '.join(map(str, contract.bits))} bits")
    found = {o: o.rstrip("0123456789") for o in re.findall(option, match["options"])}  # {"s3": "s", "sym": "sym"}
    allowed = {o.name for o in contract.options}
    if set(found.values()) - allowed:
        if not allowed:
            raise UserError(f"tag {tag!r}: {contract.name} takes no options; drop {match['options']!r}")
        raise UserError(f"tag {tag!r}: {contract.name} takes the options {', '.join(sorted(allowed))}")
    multiple = contract.group_multiple
    if match["group"] is not None and not multiple:
        raise UserError(f"tag {tag!r}: {contract.name}{bits} takes no group size")
    group = int(match["group"] or 0)
    if match["group"] is not None and (group < multiple or group % multiple):
        raise UserError(f"tag {tag!r}: the group size must be a multiple of {multiple} "
                        f"(e.g. {multiple}, {2 * multiple}, {4 * multiple})")
    spec = QuantSpec(contract.name, bits, group, {o for o, name in found.items() if o == name},
                     {name: int(o[len(name):]) for o, name in found.items() if o != name})
    contract.params(spec).check()
    return spec
