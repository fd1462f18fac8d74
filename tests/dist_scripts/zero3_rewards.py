"""A reward for the launched train.py runs of tests/test_zero3.py that varies on a random model's text, so
every group has signal and the update moves the weights (`vowel_fraction` is mostly 0 on 8 random bytes)."""


def even_chars(prompts, completions, **_):
    """Share of the completion's characters with an even code point.

    >>> even_chars(["", "", ""], ["ab", "bd", ""])
    [0.5, 1.0, 0.0]
    """
    return [sum(ord(c) % 2 == 0 for c in s) / len(s) if s else 0.0 for s in completions]
