"""egressd: an egress FQDN-filtering proxy for Kubernetes.

One connection, end to end::

  app ─TCP─▶ listener ─▶ identify ─▶ sniff ─▶ decide ─▶ resolve+pin ─▶ dial ─▶ relay ─▶ audit + metrics

listener
    :mod:`egressd.listeners.explicit` accepts a client into a
    :class:`egressd.relay.Side`, takes its address from the accepted socket,
    lets :meth:`egressd.connection.Engine.admit` refuse it (503: connection
    caps, per client IP, the file-descriptor room of :mod:`egressd.fdlimit`,
    an audit log that cannot be written) and reads the request heads with
    llhttp in the loop of :mod:`egressd.listeners.requests`, each head holding
    a slot of :mod:`egressd.limits` (which names every limit) while it arrives (CONNECT
    host:port, or an absolute-form URL, whose requests
    :mod:`egressd.listeners.forward` handles one by one, a WebSocket upgrade
    becoming a tunnel). In a pod, :mod:`egressd.listeners.transparent` takes
    the connections the rules of :mod:`egressd.iptables` redirect (the original
    destination from ``SO_ORIGINAL_DST``, the name from the first bytes, sorted
    by :mod:`egressd.sniff.first`), and :mod:`egressd.listeners.dns` with
    :mod:`egressd.dnsfilter` answers the app's DNS: names the policy allows are
    forwarded (their answers seed the resolver), all others get NXDOMAIN and an
    ``egress.dns`` record.
identify
    :meth:`egressd.connection.Engine.identify` asks
    :class:`egressd.identity.identify.Identifier` which service the client is:
    fixed (``--service``, the sidecar), or at a gateway, per request, a
    service-account token in ``Proxy-Authorization``
    (:mod:`egressd.identity.token`, keys from :mod:`egressd.identity.jwks`),
    the client's pod by its address (:mod:`egressd.identity.podindex`,
    list+watch, over the pure :mod:`egressd.identity.podtable`), or a static
    range; the policy's ``identities:`` (:mod:`egressd.policy.identities`)
    map the identity to a service (:mod:`egressd.identity.sources` builds
    the sources).
sniff
    Pure parsers, bytes in, value out: :mod:`egressd.sniff.http` (HTTP/1.x
    messages through llhttp), :mod:`egressd.sniff.target` (request target, Host
    binding), :mod:`egressd.sniff.tls` (ClientHello SNI, ECH),
    :mod:`egressd.sniff.dns` (DNS messages);
    :mod:`egressd.hostport` normalises every name once (IDNA, case, trailing
    dot, canonical IP literals).
decide
    :func:`egressd.policy.decide.decide` over the compiled
    :class:`egressd.policy.model.Policy` that :mod:`egressd.policy.loader` built
    from ``allowlists/``: a verdict, a reason from a closed set, the rule's file:line.
    Host patterns and their index are :mod:`egressd.policy.match`, the Public
    Suffix List's safety rule :mod:`egressd.policy.suffixes`. A host rule's
    ``inspect:`` (read by :mod:`egressd.policy.inspectformat`) makes the
    decision carry request rules; :mod:`egressd.inspect` holds inspect mode:
    its pure (method, path) check :mod:`egressd.inspect.rules`
    (``check_request`` over ``normalize_path``), the engine's side
    :mod:`egressd.inspect.client` (starts the worker, hands it pinned
    tunnels, turns its lines into ``egress.request`` records), and the worker
    process :mod:`egressd.inspect.worker` (mitmproxy embedded, with the addon
    :mod:`egressd.inspect.addon` and the CA of :mod:`egressd.inspect.ca`,
    ``egressd inspect-ca`` in :mod:`egressd.cli.inspect`). The review tools
    read the same policy: :mod:`egressd.policy.lint`, :mod:`egressd.policy.diff`
    (with :mod:`egressd.policy.revision`), :mod:`egressd.policy.policytest` and
    :mod:`egressd.policy.suggest`.
resolve+pin
    :class:`egressd.resolve.Resolver` looks allowed names up itself (dnspython,
    TTL cache) and :mod:`egressd.addresses` classifies every answer; only
    allowed addresses are kept.
dial
    :meth:`egressd.connection.Engine.connect` connects to those addresses by IP,
    in order; the socket layer never resolves again.
relay
    On TLS ports the SNI must equal the CONNECT host first; then
    :func:`egressd.relay.splice` pumps bytes with back-pressure and counters.
audit + metrics
    :meth:`egressd.connection.Engine.close` writes one record (the types and
    field names of :mod:`egressd.records`) through
    :class:`egressd.audit.AuditLog` and counts :mod:`egressd.metrics`, exactly
    once per connection, whatever path it took; the lines are written by the
    thread of :mod:`egressd.auditwriter`, so the event loop never waits on the
    audit stream, and while they cannot be written nothing new is served. Every
    line is sealed into its process's chain by :mod:`egressd.auditchain` (seq,
    chain, signed checkpoints), in the format of :mod:`egressd.auditformats`
    (native, or ECS and OCSF: the tables of :mod:`egressd.auditformats_ecs`
    and :mod:`egressd.auditformats_ocsf`, walked by :mod:`egressd.auditformats_map`).

Around it: :mod:`egressd.app` (start, signals, drain), :mod:`egressd.reload`
(SIGHUP and file changes, last good policy kept), :mod:`egressd.admin`
(``/metrics``, ``/healthz``, ``/readyz``), :mod:`egressd.cli` (one module per
subcommand group: :mod:`egressd.cli.run` for ``run``/``sidecar``,
:mod:`egressd.cli.policy` for ``validate``/``check``, :mod:`egressd.cli.review`
for ``diff``, :mod:`egressd.cli.policytest` for ``test``, :mod:`egressd.cli.suggest`
for ``suggest``, :mod:`egressd.cli.audit` for ``audit verify``/``audit keygen``,
:mod:`egressd.cli.iptables` for ``init-iptables``, :mod:`egressd.cli.webhook`
and :mod:`egressd.cli.sync` for the injector's two processes), and
:mod:`egressd.demo` with the stand-ins of :mod:`egressd.lab` on loopback, or
:mod:`egressd.demo_sidecar` in the simulated pod of :mod:`egressd.lab.pod`
(namespaces from :mod:`egressd.lab.netns`), or :mod:`egressd.demo_inspect` for
inspect mode.

In Kubernetes (names shared with ``k8s/`` in :mod:`egressd.kube`): the
admission webhook of :mod:`egressd.webhook` answers each new pod with
:func:`egressd.inject.review`, a JSON patch built from the templates of
``sidecar/`` (:mod:`egressd.sidecartemplates`) that adds ``init-iptables`` and
egressd as a native sidecar; :mod:`egressd.allowlistsync` keeps a copy of the
allowlist ConfigMap in every namespace labelled for injection (the decisions in
the pure :mod:`egressd.allowlistplan`), for the sidecars to mount. It and the
pod index reach the API server through :mod:`egressd.kubeclient`.
"""

__version__ = "0.1.0"
