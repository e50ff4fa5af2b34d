"""The opt-in TLS-inspection mode: method and path rules for names that must stay allowed.

A host rule with ``inspect:`` (see ``allowlists/README.md``) allows a name only for the requests its entries
list. This package holds the pure (method, path) rule check now, :mod:`egressd.inspect.rules` (the entries,
path normalisation, glob matching, :func:`~egressd.inspect.rules.check_request`), and will hold the mitmproxy
worker later, in its own process. Nothing here imports mitmproxy: the loader only asks, through
:func:`~egressd.inspect.rules.inspect_unavailable`, whether it could run.
"""
