"""The hostile-input suite: what an attacker or a bad day sends each listener, as a table of named rows.

Every row is one :class:`hostile.table.Case`::

    name      what the row is, e.g. "te-chunked-then-identity", "hello-sni-with-nul", "compression-points-at-itself"
    send      the bytes or actions: raw request bytes, a CONNECT then a ClientHello in 1-byte writes, a DNS
              message over UDP or TCP, a Proxy-Authorization value
    answer    what the client must see: "400", "431", "403", "407", "200", "tunnel+tls", "tunnel+closed",
              "alert", "closed", or a DNS rcode ("FORMERR", "NXDOMAIN", ..., "none")
    reason    the ``reason`` of the audit record (``bad_request``, ``sni_missing``, ``forbidden_address``, ...)
    record    other fields the record must hold (``sni``, ``host``, ``upstream``, ``identity``, ...)
    count     how many records the row makes: one per connection (per query for the DNS filter), never two

Each module starts one egressd that all its rows share (so the table runs in
seconds), and a :class:`hostile.table.Ledger` checks that every row left
exactly its records behind: a record missing, doubled or left by another row
fails the row. Rows that were refused must also have sent nothing upstream.

The modules, one listener each:

``test_explicit``     the explicit proxy's plain HTTP: request smuggling (CL+TE, duplicate and odd
                      Content-Length, Transfer-Encoding variants, bad chunk sizes, bare CR/LF, obs-fold, fields a
                      Connection header or a trailer would hoist), oversized and slow heads, absolute-form URLs
                      and Host headers, pipelined requests; slowloris on the head while a normal client is served
``test_explicit_tls`` CONNECT authorities (user-info, ports 0 and 65536, every IP-literal form) and the
                      ClientHello after them (1-byte writes, 1- and 4-byte records, truncated, oversized, several
                      or odd server names); slowloris on the ClientHello while a normal client is served
``test_resolution``   hostile answers to egressd's own lookups: CNAME loops and long chains, 500 A records,
                      forbidden and embedded forms, TTL 0, an answer that changes between two lookups
``test_transparent``  redirected connections (a network namespace with an iptables REDIRECT, root only): the
                      same ClientHello and HTTP rows as the transparent listener sees them; slowloris
``test_dns_filter``   the DNS filter: truncated, oversized and compression-loop messages, odd questions, types
                      and classes, TCP framing, a flood and a burst from one client
``test_identity``     gateway identity: oversized and malformed JWTs, odd Proxy-Authorization, a token for
                      another audience, huge and deeply nested JWKS

A row that shows a bug in code outside the listeners and parsers is kept as a
strict ``xfail`` naming the module and the fault, until that module is fixed.
Rows that repeat a case of the older tests are marked "(regression)" there.
:mod:`hostile.wire` holds the client actions, :mod:`hostile.hello` the
ClientHellos, :mod:`hostile.dnswire` the DNS messages and
:mod:`hostile.explicit` the explicit listener's rules and row check.
"""
