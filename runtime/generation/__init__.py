"""Generation: the prefill-then-decode loop with streaming, and the choice of each next token (sampling)."""
