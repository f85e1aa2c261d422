"""Text: the tokenizer (text <-> token ids, streaming decode, chat templates) and text
checks. Imports nothing of pallax outside `pallax.text`."""
