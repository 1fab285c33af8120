"""Chat templates from model files, rendered the way transformers' `apply_chat_template` renders them.

A chat template is Jinja2 source shipped with a model (tokenizer_config.json,
chat_template.jinja or a GGUF key), so it is untrusted: it runs in Jinja's
sandbox with bounds on time, output and built values (`BoundedTemplateEnvironment`).
Imported only when a chat prompt is rendered (runtime/text/tokenizer.py
`Tokenizer.apply_chat_template`).
"""

import sys
import time

import jinja2
import jinja2.compiler
import jinja2.sandbox

from runtime.errors import UserError


def render(template: str, messages: list, specials: dict) -> str:
    """Template `template` rendered for `messages`, ready for the assistant's reply; UserError when it fails."""
    env = BoundedTemplateEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_template_error
    try:
        return env.render_bounded(template, messages=messages, add_generation_prompt=True, **specials)
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError, RecursionError) as e:
        raise UserError(f"the model's chat template failed ({type(e).__name__}: {e}); "
                        "send the prompt as plain text instead") from None


def _raise_template_error(message):
    raise UserError(f"the model's chat template refused the conversation: {message}")


class BoundedCodeGenerator(jinja2.compiler.CodeGenerator):
    """Jinja's code generator, with every `~` concatenation checked by the environment's length cap."""

    def visit_Concat(self, node, frame):
        self.write("environment.bounded(")
        super().visit_Concat(node, frame)
        self.write(")")


class BoundedTemplateEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Jinja's sandbox with bounds on what a chat template from a model file may cost.

    The sandbox already stops templates from reaching Python internals and caps
    range() at 100000 items; this adds a time budget (checked on every line
    the template's code runs, so nested loops stop), a cap on the length of the
    output and of every string or list that repetition (*), addition (+) or
    concatenation (~) builds, a cap on powers (**), and a cap on the integers
    passed to any call (so 'a'.center(10**12) never allocates).
    """

    code_generator_class = BoundedCodeGenerator
    intercepted_binops = frozenset(["*", "**", "+"])
    max_seconds = 2.0
    max_length = 1_000_000  # characters of output, items or characters of any built value
    max_power_bits = 100_000

    def call_binop(self, context, operator, left, right):
        """`left operator right`, refused when its result would exceed the bounds."""
        if operator == "*":
            counts = [v for v in (left, right) if isinstance(v, int)]
            sized = [v for v in (left, right) if isinstance(v, (str, list, tuple))]
            if counts and sized and len(sized[0]) * counts[0] > self.max_length:
                raise UserError(self.limit_message(f"repeats a value to more than {self.max_length} items"))
        if (operator == "**" and isinstance(left, int) and isinstance(right, int)
                and right * max(abs(left).bit_length(), 1) > self.max_power_bits):
            raise UserError(self.limit_message(f"computes a power of more than {self.max_power_bits} bits"))
        return self.bounded(super().call_binop(context, operator, left, right))

    def call(self, __context, __obj, *args, **kwargs):
        """A call from the template, refused when it passes an integer above the length cap."""
        if any(isinstance(a, int) and abs(a) > self.max_length for a in (*args, *kwargs.values())):
            raise UserError(self.limit_message(f"passes a number above {self.max_length} to a function"))
        return super().call(__context, __obj, *args, **kwargs)

    def bounded(self, value):
        """`value`, unless it is a string or list longer than the cap."""
        if isinstance(value, (str, list, tuple)) and len(value) > self.max_length:
            raise UserError(self.limit_message(f"builds a value of more than {self.max_length} items"))
        return value

    def limit_message(self, what: str) -> str:
        return f"the model's chat template {what}; send the prompt as plain text instead (without --chat)"

    def render_bounded(self, source: str, **context) -> str:
        """Render template `source` within the time budget and the output cap."""
        template = self.from_string(source)
        deadline = time.monotonic() + self.max_seconds

        def trace(frame, event, arg):
            if time.monotonic() > deadline:
                raise UserError(self.limit_message(f"ran longer than {self.max_seconds:g} s"))
            return trace

        pieces, length = [], 0
        previous = sys.gettrace()
        sys.settrace(trace)
        try:
            for piece in template.generate(**context):
                length += len(piece)
                if length > self.max_length:
                    raise UserError(self.limit_message(f"writes more than {self.max_length} characters"))
                pieces.append(piece)
        finally:
            sys.settrace(previous)
        return "".join(pieces)
