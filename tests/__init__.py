"""Odissey's test suite (run with ``python -m twisted.trial tests``)."""

from hypothesis import settings

# Property tests check what parsers do, not how fast: a shared, noisy CI machine must not
# turn a slow example into a failure (hypothesis's default deadline is 200 ms).
settings.register_profile("odissey", deadline=None, print_blob=True)
settings.load_profile("odissey")
