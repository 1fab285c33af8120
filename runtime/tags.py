"""The tag grammar: how a quantized model's name says what was done to it.

A quantized model is named `BASE.TAG`, e.g. `smollm2-135m.rtn4g128`:

    TAG     = METHOD BITS [ "g" GROUP ] { OPTION }
    METHOD  = "rtn"                  round-to-nearest (rtn.py), BITS 2 | 3 | 4 | 8
            | "nf" | "fp"            NF4 / FP4 of QLoRA (nf4.py), BITS 4
    GROUP   = weights sharing one scale: rtn, a multiple of 32 (absent: one per row);
              nf / fp, a multiple of 8 (absent: 64)
    OPTION  = "sym"     rtn: symmetric grid (no zero point)
            | "mse"     rtn: MSE-optimal clipping search
            | "tensor"  rtn: one scale for the whole tensor
            | "dq"      nf / fp: double quantization of the scales

A tag is a request: the saved model's config.json records the method and its
parameters, and that record, never the name, is what the loader trusts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from runtime.errors import UserError

TAG_PATTERN = re.compile(r"^(?P<method>[a-z]+?)(?P<bits>\d+)(?:g(?P<group>\d+))?(?P<options>(?:sym|mse|tensor|dq)*)$")
OPTIONS = ("sym", "mse", "tensor", "dq")
METHOD_BITS = {"rtn": (2, 3, 4, 8), "nf": (4,), "fp": (4,)}
METHOD_OPTIONS = {"rtn": {"sym", "mse", "tensor"}, "nf": {"dq"}, "fp": {"dq"}}
GROUP_MULTIPLE = {"rtn": 32, "nf": 8, "fp": 8}
EXAMPLES = "rtn4g128, rtn4, rtn3g64sym, rtn2g64mse, rtn8tensor, nf4, nf4dq, fp4, nf4g128"


@dataclass
class QuantSpec:
    """A parsed tag: the method and the settings it was asked for."""
    method: str
    bits: int
    group_size: int = 0          # 0 = one group per row
    options: set = field(default_factory=set)

    @property
    def tag(self) -> str:
        group = f"g{self.group_size}" if self.group_size else ""
        return f"{self.method}{self.bits}{group}{''.join(o for o in OPTIONS if o in self.options)}"


def parse_tag(tag: str) -> QuantSpec:
    """The spec a tag stands for; UserError listing the valid forms otherwise."""
    match = TAG_PATTERN.match(tag)
    if not match or match["method"] not in METHOD_BITS:
        raise UserError(f"unknown quantization tag {tag!r}: valid tags are METHOD BITS [gGROUP] "
                        f"[{'|'.join(OPTIONS)}] with METHOD one of {', '.join(METHOD_BITS)} "
                        f"(e.g. {EXAMPLES})")
    method, bits = match["method"], int(match["bits"])
    if bits not in METHOD_BITS[method]:
        raise UserError(f"tag {tag!r}: {method} supports {', '.join(map(str, METHOD_BITS[method]))} bits")
    options = set(re.findall("|".join(OPTIONS), match["options"]))
    if options - METHOD_OPTIONS[method]:
        raise UserError(f"tag {tag!r}: {method} takes the options {', '.join(sorted(METHOD_OPTIONS[method]))}")
    group = int(match["group"] or 0)
    if group and "tensor" in options:
        raise UserError(f"tag {tag!r}: a group size and 'tensor' exclude each other")
    multiple = GROUP_MULTIPLE[method]
    if match["group"] is not None and (group < multiple or group % multiple):
        raise UserError(f"tag {tag!r}: the group size must be a multiple of {multiple} (e.g. 32, 64, 128)")
    return QuantSpec(method, bits, group, options)
