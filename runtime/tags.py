"""The tag grammar: how a quantized model's name says what was done to it.

A quantized model is named `BASE.TAG`, e.g. `smollm2-135m.rtn4g128`:

    TAG     = METHOD BITS [ "g" GROUP ] { OPTION }
    METHOD  = "rtn"                  round-to-nearest (rtn.py), BITS 2 | 3 | 4 | 8
            | "gptq"                 GPTQ with calibration data (gptq.py), BITS 2 | 3 | 4 | 8
            | "nf" | "fp"            NF4 / FP4 of QLoRA (nf4.py), BITS 4
            | "int"                  LLM.int8(): vector-wise W8A8 + outlier decomposition at 6.0 (int8.py), BITS 8
            | "absmax"               naive W8A8, one scale per weight and per activation tensor, BITS 8
            | "smooth"               SmoothQuant (alpha 0.5), then per-row / per-token W8A8, BITS 8
            | "spqr"                 SpQR: small groups, 3-bit statistics, fp16 outliers (spqr.py), BITS 2 | 3 | 4
            | "quip"                 QuIP: incoherence processing + LDLQ, uniform grid (quip.py), BITS 2 | 3 | 4
            | "quipsharp"            QuIP#: Hadamard incoherence + BlockLDLQ on E8P (quipsharp.py), BITS 2 | 3 | 4
            | "q"                    the best method at that width (ALIASES): q2 = quipsharp2, q3, q4
    GROUP   = weights sharing one scale: rtn / gptq, a multiple of 32 (absent: one per row);
              nf / fp, a multiple of 8 (absent: 64); spqr, a multiple of 16 (absent: 16);
              int / absmax / smooth / quip / quipsharp take none
    OPTION  = "sym"     rtn / gptq: symmetric grid (no zero point)
            | "mse"     rtn: MSE-optimal clipping search
            | "tensor"  rtn: one scale for the whole tensor
            | "dq"      nf / fp: double quantization of the scales
            | "act"     gptq: act-order (columns by descending Hessian diagonal)
            | "static"  gptq: all group grids fitted before any update (needs GROUP)
            | "s" N     spqr: bits of the quantized group statistics (absent: 3; s16 keeps them in fp16)
            | "t" N     spqr: outlier threshold tau in hundredths (absent: t20, tau = 0.2);
                        int: LLM.int8's outlier threshold in hundredths (absent: t600, 6.0)
            | "dense"   spqr: no outliers (tau = infinity)

A tag is a request: the saved model's config.json records the method and its
parameters, and that record, never the name, is what the loader trusts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from runtime.errors import UserError

OPTIONS = ("sym", "mse", "tensor", "dq", "act", "static", "dense")
VALUE_OPTIONS = ("s", "t")  # options followed by a number
TAG_PATTERN = re.compile(r"^(?P<method>[a-z]+?)(?P<bits>\d+)(?:g(?P<group>\d+))?"
                         r"(?P<options>(?:" + "|".join(OPTIONS) + r"|[st]\d+)*)$")
METHOD_BITS = {"rtn": (2, 3, 4, 8), "gptq": (2, 3, 4, 8), "nf": (4,), "fp": (4,), "int": (8,), "absmax": (8,),
               "smooth": (8,), "spqr": (2, 3, 4), "quip": (2, 3, 4), "quipsharp": (2, 3, 4)}
METHOD_OPTIONS = {"rtn": {"sym", "mse", "tensor"}, "gptq": {"sym", "act", "static"}, "nf": {"dq"}, "fp": {"dq"},
                  "int": {"t"}, "absmax": set(), "smooth": set(), "spqr": {"s", "t", "dense"}, "quip": set(),
                  "quipsharp": set()}
GROUP_MULTIPLE = {"rtn": 32, "gptq": 32, "nf": 8, "fp": 8, "spqr": 16}  # methods absent here take no group size
STAT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)  # spqr "s": statistic widths (runtime/formats/spqr.py)
ALIASES = {"q2": "quipsharp2", "q3": "quipsharp3", "q4": "quipsharp4"}  # why these: README, "Short tags"
EXAMPLES = ("rtn4g128, rtn4, rtn3g64sym, rtn2g64mse, rtn8tensor, gptq4g128, gptq3, gptq4g128act, "
            "nf4, nf4dq, fp4, nf4g128, int8, int8t150, absmax8, smooth8, spqr3, spqr4g16s3t20, spqr3dense, quip2, "
            "quipsharp2, q2, q3, q4")
TAG_FORMS = (f"METHOD BITS [gGROUP] [{'|'.join(OPTIONS)}|sN|tN] with METHOD one of {', '.join(METHOD_BITS)}, "
             f"or a short tag {', '.join(ALIASES)} (e.g. {EXAMPLES})")


@dataclass
class QuantSpec:
    """A parsed tag: the method and the settings it was asked for."""
    method: str
    bits: int
    group_size: int = 0          # 0 = one group per row
    options: set = field(default_factory=set)
    values: dict = field(default_factory=dict)  # numeric options, e.g. {"s": 3, "t": 20}

    @property
    def tag(self) -> str:
        group = f"g{self.group_size}" if self.group_size else ""
        numbers = "".join(f"{k}{self.values[k]}" for k in VALUE_OPTIONS if k in self.values)
        return f"{self.method}{self.bits}{group}{''.join(o for o in OPTIONS if o in self.options)}{numbers}"


def parse_tag(tag: str) -> QuantSpec:
    """The spec a tag stands for; UserError listing the valid forms otherwise."""
    if not tag:
        raise UserError(f"the quantization tag is empty: valid tags are {TAG_FORMS}")
    if tag.startswith("q") and tag[1:].isdigit():
        if tag not in ALIASES:
            raise UserError(f"unknown short tag {tag!r}: the short tags are {', '.join(ALIASES)}")
        return parse_tag(ALIASES[tag])
    match = TAG_PATTERN.match(tag)
    if not match or match["method"] not in METHOD_BITS:
        raise UserError(f"unknown quantization tag {tag!r}: valid tags are {TAG_FORMS}")
    method, bits = match["method"], int(match["bits"])
    if bits not in METHOD_BITS[method]:
        raise UserError(f"tag {tag!r}: {method} supports {', '.join(map(str, METHOD_BITS[method]))} bits")
    found = re.findall("|".join(OPTIONS) + r"|[st]\d+", match["options"])
    options = {o for o in found if o in OPTIONS}
    values = {o[0]: int(o[1:]) for o in found if o not in OPTIONS}
    if (options | set(values)) - METHOD_OPTIONS[method]:
        if not METHOD_OPTIONS[method]:
            raise UserError(f"tag {tag!r}: {method} takes no options; drop {match['options']!r}")
        raise UserError(f"tag {tag!r}: {method} takes the options {', '.join(sorted(METHOD_OPTIONS[method]))}")
    if "s" in values and values["s"] not in STAT_BITS:
        raise UserError(f"tag {tag!r}: statistic bits s{values['s']} must be one of {STAT_BITS}")
    if "t" in values and ("dense" in options or values["t"] == 0):
        raise UserError(f"tag {tag!r}: give either a positive outlier threshold tN or 'dense' (no outliers)")
    group = int(match["group"] or 0)
    if group and "tensor" in options:
        raise UserError(f"tag {tag!r}: a group size and 'tensor' exclude each other")
    if "static" in options and not group:
        raise UserError(f"tag {tag!r}: 'static' fixes the grids of groups; give a group size (e.g. g128)")
    if match["group"] is not None and method not in GROUP_MULTIPLE:
        raise UserError(f"tag {tag!r}: {method}{bits} takes no group size")
    multiple = GROUP_MULTIPLE.get(method, 1)
    if match["group"] is not None and (group < multiple or group % multiple):
        raise UserError(f"tag {tag!r}: the group size must be a multiple of {multiple} "
                        f"(e.g. {multiple}, {2 * multiple}, {4 * multiple})")
    return QuantSpec(method, bits, group, options, values)
