"""Decoding: batched joint CTC/attention beam search and the program that runs it."""
