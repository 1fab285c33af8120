"""The tag grammar: how a quantized model's name says what was done to it.

A quantized model is named `BASE.TAG`, e.g. `smollm2-135m.rtn4g128`:

    TAG     = METHOD BITS [ "g" GROUP ] { OPTION }
    METHOD  = "rtn"                  round-to-nearest (rtn.py), BITS 2 | 3 | 4 | 8
            | "gptq"                 GPTQ with calibration data (gptq.py), BITS 2 | 3 | 4 | 8
            | "nf" | "fp"            NF4 / FP4 of QLoRA (nf4.py), BITS 4
            | "int"                  LLM.int8(): vector-wise W8A8 + outlier decomposition at 6.0 (int8.py), BITS 8
            | "absmax"               naive W8A8, one scale per weight and per activation tensor, BITS 8
            | "smooth"               SmoothQuant (alpha 0.5), then per-row / per-token W8A8, BITS 8
    GROUP   = weights sharing one scale: rtn / gptq, a multiple of 32 (absent: one per row);
              nf / fp, a multiple of 8 (absent: 64); int / absmax / smooth take none
    OPTION  = "sym"     rtn / gptq: symmetric grid (no zero point)
            | "mse"     rtn: MSE-optimal clipping search
            | "tensor"  rtn: one scale for the whole tensor
            | "dq"      nf / fp: double quantization of the scales
            | "act"     gptq: act-order (columns by descending Hessian diagonal)
            | "static"  gptq: all group grids fitted before any update (needs GROUP)

A tag is a request: the saved model's config.json records the method and its
parameters, and that record, never the name, is what the loader trusts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from runtime.errors import UserError

TAG_PATTERN = re.compile(r"^(?P<method>[a-z]+?)(?P<bits>\d+)(?:g(?P<group>\d+))?(?P<options>(?:sym|mse|tensor|dq|act|static)*)$")
OPTIONS = ("sym", "mse", "tensor", "dq", "act", "static")
METHOD_BITS = {"rtn": (2, 3, 4, 8), "gptq": (2, 3, 4, 8), "nf": (4,), "fp": (4,), "int": (8,), "absmax": (8,),
               "smooth": (8,)}
METHOD_OPTIONS = {"rtn": {"sym", "mse", "tensor"}, "gptq": {"sym", "act", "static"}, "nf": {"dq"}, "fp": {"dq"},
                  "int": set(), "absmax": set(), "smooth": set()}
GROUP_MULTIPLE = {"rtn": 32, "gptq": 32, "nf": 8, "fp": 8}  # methods absent here take no group size
EXAMPLES = ("rtn4g128, rtn4, rtn3g64sym, rtn2g64mse, rtn8tensor, gptq4g128, gptq3, gptq4g128act, "
            "nf4, nf4dq, fp4, nf4g128, int8, absmax8, smooth8")


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
    if "static" in options and not group:
        raise UserError(f"tag {tag!r}: 'static' fixes the grids of groups; give a group size (e.g. g128)")
    if match["group"] is not None and method not in GROUP_MULTIPLE:
        raise UserError(f"tag {tag!r}: {method}{bits} takes no group size")
    multiple = GROUP_MULTIPLE.get(method, 1)
    if match["group"] is not None and (group < multiple or group % multiple):
        raise UserError(f"tag {tag!r}: the group size must be a multiple of {multiple} (e.g. 32, 64, 128)")
    return QuantSpec(method, bits, group, options)
