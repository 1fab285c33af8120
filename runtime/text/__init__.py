"""Text: the tokenizer (text <-> token ids, chat templates) and the evaluation data sets."""
