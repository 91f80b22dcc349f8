"""Deliberately broken reward functions for the bad-input tests."""


def raises(prompts, completions, **_):
    raise ZeroDivisionError("boom")


def wrong_length(prompts, completions, **_):
    return [1.0]
