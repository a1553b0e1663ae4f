"""plait.data: text to tokens, token windows, and the step-indexed loader."""
