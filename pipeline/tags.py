"""The tag grammar: how a quantized model's name says what was done to it.

A quantized model is named `BASE.TAG`, e.g. `smollm2-135m.rtn4g128`:

    TAG     = METHOD BITS [ "g" GROUP ] { OPTION }  |  SHORT
    OPTION  = WORD | LETTER NUMBER                   e.g. "sym", "s3"
    SHORT   = q2 | q3 | q4                           the best method at that width (ALIASES)

Which METHOD letters exist, their BITS, whether and how they take a GROUP,
their OPTIONs and their defaults is not written here: each method file
declares it once, as `CONTRACTS` (runtime/method_contract.py's MethodContract),
and METHOD_MODULES lists those files. The parser, the build driver
(pipeline/quantize_model.py) and quantize.py's help loop over the declarations.
The method files are imported on first use (`contracts()`), so importing this
module imports no method.

A tag is a request: the saved model's config.json records the method and its
parameters, and that record, never the name, is what the loader trusts.
"""
from __future__ import annotations

import importlib
import re

from runtime.errors import UserError
from runtime.method_contract import QuantSpec

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


def contracts() -> dict:
    """{METHOD letters: MethodContract} of every method module, imported here on first use."""
    return {c.name: c for module in METHOD_MODULES for c in importlib.import_module(module).CONTRACTS}


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
    spec = contract.spec(bits, group, {o for o, name in found.items() if o == name},
                         {name: int(o[len(name):]) for o, name in found.items() if o != name})
    contract.params(spec).check()
    return spec
