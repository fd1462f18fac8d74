"""A user-defined reward (loaded as ``user_rewards:vowel_fraction``) that varies even on a random model's text."""


def vowel_fraction(prompts, completions, *, completion_lengths=None, **_):
    """Share of vowels among the completion's characters.

    >>> vowel_fraction(["", ""], ["aab", ""])
    [0.6666666666666666, 0.0]
    """
    return [sum(c in "aeiou" for c in s) / len(s) if s else 0.0 for s in completions]


def text_hash(prompts, completions, *, completion_lengths=None, **_):
    """A number from the completion's bytes: differs within a group unless all its completions are identical.

    >>> text_hash([""], ["abc"])
    [0.578]
    """
    import zlib

    return [(zlib.crc32(s.encode()) % 1000) / 1000 for s in completions]
