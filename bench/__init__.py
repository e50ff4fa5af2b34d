"""The egressd benchmark: egressd, Squid and tinyproxy (and no proxy) side by side on loopback.

::

    private net+mount namespace (root), lo only, /etc/hosts = the benchmark names
    ┌─ core 0 ────────────┐        ┌─ core 1 ─────────────────────────────────────────┐
    │ the proxy under test │◀──────│ load generator (loadc.c / load.py / wrk)          │
    │ egressd | squid |    │──────▶│ origins: echo, bulk source (origin.py), nginx     │
    │ tinyproxy            │──DNS─▶│ DnsServer in a LabThread of the runner (egressd)  │
    └──────────────────────┘        └──────────────────────────────────────────────────┘

* :mod:`bench.scenario`: pure: names, ports, and every generated config (allowlist, squid.conf, tinyproxy filter).
* :mod:`bench.procs`: starting pinned processes, deadlines, CPU and RSS of a process tree from /proc.
* :mod:`bench.proxies`: starting each system and waiting until it accepts.
* :mod:`bench.origin`, :mod:`bench.load`, ``loadc.c``: the origins and the load generators (separate processes).
* :mod:`bench.phases`: one function per figure; :mod:`bench.records`: audit records and logs after the load.
* :mod:`bench.runner`: the session (set-up, per run and system, teardown); :mod:`bench.report`: medians,
  ratios egressd/Squid, targets, the markdown table; :mod:`bench.cli`: options, namespaces, output.
* :mod:`bench.sidecar` (with ``sidecar_world``, ``sidecar_phases``, ``sidecar_report``, ``dnsload.c``): sidecar
  mode in a simulated pod, the transparent listener next to the explicit one, the DNS filter next to dnsmasq.
* :mod:`bench.leaks` (with ``leaks_world``, ``leaks_load``, ``leaks_report``): load without leaks: idle tunnels
  held, short tunnels churned, a steady soak; descriptors, RSS and one record per connection.
* :mod:`bench.matching`: the cost of one host lookup in a rule set, two revisions side by side.
"""
