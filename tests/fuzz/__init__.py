"""The fuzz tier: Hypothesis-generated requests and upstream responses against a real relay."""
