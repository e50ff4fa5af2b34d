"""The opt-in TLS-inspection mode: method and path rules for names that must stay allowed.

A host rule with ``inspect:`` (see ``allowlists/README.md``) allows a name only for the requests its entries
list. This package holds the pure (method, path) rule check now, :mod:`egressd.inspect.rules` (the entries,
path normalisation, glob matching, :func:`~egressd.inspect.rules.check_request`), and the mitmproxy worker, in
its own process (docs/inspect.md): the engine's :class:`~egressd.inspect.client.Inspector` starts
:mod:`egressd.inspect.worker` (with the addon of :mod:`egressd.inspect.addon` and the CA of
:mod:`egressd.inspect.ca`) and hands it tunnels. Only the worker and its addon import mitmproxy: the loader only
asks, through :func:`~egressd.inspect.rules.inspect_unavailable`, whether it could run.
"""
