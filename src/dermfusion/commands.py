"""Registers the verbs that need the heavier stages (training, evaluation, serving) on the CLI app."""
