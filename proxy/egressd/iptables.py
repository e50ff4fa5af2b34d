"""The pod's iptables rules: pure rendering (rules in, ``iptables-restore`` text out) and one apply/clean function.

What the rules do to a packet the pod sends (both families; IPv6 redirects to ``[::1]``)::

    raw    EGRESSD_OUTPUT      UDP DNS the sidecar sends, or that goes out as sent  -> conntrack zone 1
           EGRESSD_PREROUTING  answers from port 53 arriving from outside           -> zone 1
                               the app's other UDP DNS, and the filter's answers    -> zone 2
    nat    EGRESSD_OUTPUT      proxy UID, excluded UIDs, TCP ports: untouched
                               DNS (UDP and TCP port 53), to any address, loopback and excluded CIDRs too
                                                                                 -> the DNS filter port
                               excluded CIDRs, loopback (lo: 127/8, ::1, the pod's own addresses): untouched
                               every other TCP connection -> the transparent port
    filter EGRESSD_OUTPUT      UDP only: loopback, proxy UID, redirected (DNAT), answers to flows started from
                               outside, excluded UIDs, CIDRs and UDP ports pass; every other UDP packet is dropped

Why zones: conntrack keys UDP on addresses and ports alone. When the app and the sidecar send DNS from the
same address and port to the same server, they share one entry: the app's query then escapes the redirect
(and is dropped) or the sidecar's is redirected back to itself. Zone 2 holds the app's side (query,
redirect, answer), zone 1 the sidecar's, so the two never meet (what Istio does for its DNS proxy).

Every rule lives in chains of our own (``EGRESSD_OUTPUT``, ``EGRESSD_PREROUTING``) with one jump from the
built-in chain, inserted first. :func:`render` takes what a save dump shows of ours (:func:`parse_save`)
and removes it in the same transaction, so applying twice gives the same rules and one jump;
:func:`render_clean` removes it all. :func:`apply` is the only code that runs commands (through one
``runner``) or writes to ``/proc``.
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from egressd.config import ConfigError
from egressd.policy.model import IPNetwork

__all__ = [
    "ApplyError", "Installed", "Outcome", "PodRules", "Result", "apply", "choose_backend", "commands",
    "disable_ipv6", "parse_save", "render", "render_clean", "run_command",
]

PREFIX = "EGRESSD_"
ZONE_DIRECT, ZONE_REDIRECTED = 1, 2  # conntrack zones: DNS that leaves as sent / DNS the filter answers
# (table, ((built-in chain, our chain), ...)), in the order they are written
LAYOUT = (
    ("raw", (("OUTPUT", "EGRESSD_OUTPUT"), ("PREROUTING", "EGRESSD_PREROUTING"))),
    ("nat", (("OUTPUT", "EGRESSD_OUTPUT"),)),
    ("filter", (("OUTPUT", "EGRESSD_OUTPUT"),)),
)
BACKENDS = ("auto", "nft", "legacy")
IPV6_CONF = Path("/proc/sys/net/ipv6/conf")
_MULTIPORT_MAX = 15  # ports one -m multiport rule can hold
_MAX_UID = 2**32 - 2  # (uid_t)-1 means "no user"


def cidr_text(net: IPNetwork) -> str:
    """``address/prefix`` as the C library writes it (``::ffff:0.0.0.0/96``), the same on every Python
    (3.13 changed how :mod:`ipaddress` prints IPv4-mapped IPv6 addresses)."""
    family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
    return f"{socket.inet_ntop(family, net.network_address.packed)}/{net.prefixlen}"


@dataclass(frozen=True, slots=True)
class PodRules:
    """What ``egressd init-iptables`` installs: where the sidecar listens, whom it runs as, what is left alone."""

    proxy_uid: int = 1337
    transparent_port: int = 15001
    dns_port: int = 15053
    exclude_cidrs: tuple[IPNetwork, ...] = ()
    exclude_ports: tuple[int, ...] = ()
    exclude_uids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("transparent_port", "dns_port"):
            if not 1 <= getattr(self, name) <= 65535:
                raise ConfigError(f"--{name.replace('_', '-')} must be a port 1-65535, not {getattr(self, name)}")
        if self.transparent_port == self.dns_port:
            raise ConfigError(f"--transparent-port and --dns-port are both {self.dns_port}: give two ports")
        if bad := [p for p in self.exclude_ports if not 1 <= p <= 65535]:
            raise ConfigError(f"--exclude-port {bad[0]}: a port is 1-65535")
        if bad := [u for u in (self.proxy_uid, *self.exclude_uids) if not 0 <= u <= _MAX_UID]:
            raise ConfigError(f"user ID {bad[0]} is out of range 0-{_MAX_UID}")

    @property
    def redirects_dns(self) -> bool:
        """False when ``--exclude-port 53`` lets DNS leave as sent."""
        return 53 not in self.exclude_ports

    def cidrs(self, family: int) -> list[IPNetwork]:
        return [c for c in self.exclude_cidrs if c.version == family]


@dataclass(frozen=True, slots=True)
class Installed:
    """What of ours a save dump shows: our chains, and every rule in another chain that jumps to one."""

    chains: tuple[tuple[str, str], ...] = ()  # (table, chain)
    jumps: tuple[tuple[str, str], ...] = ()  # (table, rule as saved without "-A ", e.g. "OUTPUT -j EGRESSD_OUTPUT")

    def removals(self, table: str, keep: Sequence[str] = ()) -> list[str]:
        """Restore lines that delete our jumps in ``table`` and every chain of ours not in ``keep``."""
        stale = [chain for t, chain in self.chains if t == table and chain not in keep]
        return [f"-D {rule}" for t, rule in self.jumps if t == table] + [f"-F {c}" for c in stale] + [
            f"-X {c}" for c in stale
        ]


_JUMP = re.compile(r"\s-[jg] (" + PREFIX + r"\S+)(\s|$)")


def parse_save(dump: str) -> Installed:
    """Our chains and the jumps to them in an ``iptables-save`` dump."""
    table, chains, jumps = "", [], []
    for line in dump.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":" + PREFIX):
            chains.append((table, line[1:].split()[0]))
        elif line.startswith("-A ") and not line[3:].startswith(PREFIX) and _JUMP.search(line):
            jumps.append((table, line[3:]))
    return Installed(tuple(chains), tuple(jumps))


def _owner(uid: int) -> str:
    return f"-m owner --uid-owner {uid}"


def _ports(proto: str, ports: Sequence[int]) -> list[str]:
    chunks = [ports[i : i + _MULTIPORT_MAX] for i in range(0, len(ports), _MULTIPORT_MAX)]
    return [f"-p {proto} -m multiport --dports {','.join(map(str, chunk))}" for chunk in chunks]


def _raw(rules: PodRules, family: int) -> list[str]:
    """Conntrack zones for UDP DNS: the first CT rule a packet meets sets its zone (CT leaves tracked ones alone)."""
    if not rules.redirects_dns:
        return []
    direct, redirected = f"-j CT --zone {ZONE_DIRECT}", f"-j CT --zone {ZONE_REDIRECTED}"
    return [
        f"-A EGRESSD_OUTPUT -p udp --sport {rules.dns_port} {_owner(rules.proxy_uid)} {redirected}",
        f"-A EGRESSD_OUTPUT -p udp --dport 53 {_owner(rules.proxy_uid)} {direct}",
        f"-A EGRESSD_OUTPUT -o lo -p udp --sport 53 {direct}",
        *(f"-A EGRESSD_OUTPUT -p udp --dport 53 {_owner(uid)} {direct}" for uid in rules.exclude_uids),
        f"-A EGRESSD_OUTPUT -p udp --dport 53 {redirected}",
        f"-A EGRESSD_PREROUTING -p udp --sport 53 {direct}",
    ]


def _cidrs(rules: PodRules, family: int) -> list[str]:
    return [f"-d {cidr_text(cidr)}" for cidr in rules.cidrs(family)]


def _nat(rules: PodRules, family: int) -> list[str]:
    left_alone = [_owner(rules.proxy_uid), *(_owner(uid) for uid in rules.exclude_uids),
                  *_ports("tcp", rules.exclude_ports)]
    dns = [f"-p {proto} --dport 53 -j REDIRECT --to-ports {rules.dns_port}" for proto in ("udp", "tcp")]
    return [
        *(f"-A EGRESSD_OUTPUT {spec} -j RETURN" for spec in left_alone),
        *(f"-A EGRESSD_OUTPUT {spec}" for spec in dns if rules.redirects_dns),
        # After DNS: lookups sent to an excluded range (the cluster's Service range holds the cluster DNS
        # service) or to a resolver on loopback are filtered too; only --exclude-port 53 lets DNS go as sent.
        *(f"-A EGRESSD_OUTPUT {spec} -j RETURN" for spec in _cidrs(rules, family)),
        "-A EGRESSD_OUTPUT -o lo -j RETURN",
        f"-A EGRESSD_OUTPUT -p tcp -j REDIRECT --to-ports {rules.transparent_port}",
    ]


def _filter(rules: PodRules, family: int) -> list[str]:
    allowed = [
        "! -p udp", "-o lo", _owner(rules.proxy_uid), "-m conntrack --ctstate DNAT", "-m conntrack --ctdir REPLY",
        *(_owner(uid) for uid in rules.exclude_uids), *_cidrs(rules, family), *_ports("udp", rules.exclude_ports),
    ]
    return [f"-A EGRESSD_OUTPUT {spec} -j RETURN" for spec in allowed] + ["-A EGRESSD_OUTPUT -p udp -j DROP"]


def _header(family: int, what: str) -> str:
    command = ("ip6tables" if family == 6 else "iptables") + "-restore --noflush"
    return f"# egressd init-iptables{what}: IPv{family}, input for {command}"


def render(rules: PodRules, family: int, installed: Installed = Installed(), *, _dns_zones: bool = True) -> str:
    """The ``iptables-restore --noflush`` input that makes ``rules`` the pod's, replacing whatever of ours
    ``installed`` lists (``_dns_zones=False`` leaves the raw chains empty: only for showing why zones matter)."""
    bodies = {"raw": _raw(rules, family) if _dns_zones else [], "nat": _nat(rules, family),
              "filter": _filter(rules, family)}
    lines = [_header(family, "")]
    for table, hooks in LAYOUT:
        ours = [chain for _, chain in hooks]
        lines += [f"*{table}", *(f":{chain} - [0:0]" for chain in ours), *installed.removals(table, ours)]
        lines += [f"-I {builtin} 1 -j {chain}" for builtin, chain in hooks]
        lines += [*bodies[table], "COMMIT"]
    return "\n".join(lines) + "\n"


def render_clean(family: int, installed: Installed) -> str:
    """The ``iptables-restore --noflush`` input that removes every chain and jump of ours ``installed`` lists."""
    lines = [_header(family, " --clean")]
    for table in dict.fromkeys(t for t, _ in (*installed.chains, *installed.jumps)):
        lines += [f"*{table}", *installed.removals(table), "COMMIT"]
    return "\n".join(lines) + "\n"


def choose_backend(nft_rules: int, legacy_rules: int) -> str:
    """``auto``: the back end that already holds more rules in this namespace (kubelet's iptables-wrapper
    rule), so ours sit beside them; with none either way, ``path``: the iptables-restore on PATH."""
    if nft_rules != legacy_rules:
        return "nft" if nft_rules > legacy_rules else "legacy"
    return "path"


def commands(backend: str, family: int) -> tuple[str, str]:
    """The save and restore commands of a back end (``nft``, ``legacy`` or ``path``) for one family."""
    base = ("ip6tables" if family == 6 else "iptables") + {"nft": "-nft", "legacy": "-legacy", "path": ""}[backend]
    return f"{base}-save", f"{base}-restore"


# --- the boundary: commands and /proc ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[Sequence[str], str | None], Result]
_TIMEOUT = 60.0


def run_command(argv: Sequence[str], stdin: str | None = None) -> Result:
    """Run one command to its end; a missing command is exit 127, a hung one exit 124 (as the shell says)."""
    try:
        done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=_TIMEOUT)
    except FileNotFoundError:
        return Result(127, "", f"{argv[0]}: command not found on PATH")
    except subprocess.TimeoutExpired:
        return Result(124, "", f"{argv[0]} did not finish within {_TIMEOUT:.0f} s")
    return Result(done.returncode, done.stdout, done.stderr)


class ApplyError(Exception):
    """A command or setting failed; the message names it, what it said, and the fix."""


@dataclass(frozen=True, slots=True)
class Outcome:
    backend: str  # nft, legacy or path
    texts: tuple[tuple[str, str], ...]  # (restore command, its input), in the order applied
    notes: tuple[str, ...]  # what a person should know (warnings included)


def _failure(argv: Sequence[str], result: Result) -> str:
    said = "; ".join(line.strip() for line in result.stderr.splitlines() if line.strip())[:600] or "no message"
    if result.returncode == 127:
        fix = "install iptables in the image (Debian: apt-get install iptables) or pick another --iptables-backend"
    elif re.search(r"permission denied|not permitted", result.stderr, re.I):
        fix = "run it as root with NET_ADMIN and NET_RAW (securityContext.capabilities.add), or privileged"
    else:
        fix = ("check that the kernel offers what the rules use (raw, nat and filter tables; owner, conntrack, "
               "multiport, CT and REDIRECT), or try --iptables-backend nft or legacy; --dry-run prints the rules")
    return f"{' '.join(argv)} failed (exit {result.returncode}): {said}; fix: {fix}"


def disable_ipv6(conf: Path = IPV6_CONF) -> tuple[str, ...]:
    """Turn IPv6 off on every interface but lo, and for interfaces added later; returns the interfaces.

    Loopback keeps ``::1`` (not egress; the sidecar listens there). OSError when a setting cannot be written
    or does not read back as 1. Nothing to do when the kernel has no IPv6.
    """
    if not conf.is_dir():
        return ()
    names = ["default", *sorted(p.name for p in conf.iterdir() if p.name not in ("all", "default", "lo"))]
    for name in names:
        path = conf / name / "disable_ipv6"
        path.write_text("1\n")
        if path.read_text().strip() != "1":
            raise OSError(f"{path} still reads {path.read_text().strip()!r} after writing 1")
    return tuple(names[1:])


def resolve_backend(backend: str, runner: Runner) -> str:
    if backend != "auto":
        return backend
    counts = {}
    for name in ("nft", "legacy"):
        dumps = [runner([commands(name, family)[0]], None) for family in (4, 6)]
        counts[name] = sum(d.stdout.count("\n-A ") for d in dumps if d.returncode == 0)
    return choose_backend(counts["nft"], counts["legacy"])


def apply(
    rules: PodRules | None, *, backend: str = "auto", dry_run: bool = False, runner: Runner = run_command,
    ipv6_conf: Path = IPV6_CONF,
) -> Outcome:
    """Install ``rules`` in this network namespace (remove ours when ``rules`` is None), IPv4 then IPv6.

    Each family is one ``restore --noflush`` transaction built from what its save command shows of ours.
    ``dry_run`` reads but changes nothing. IPv4 failing raises ApplyError. IPv6 failing turns IPv6 off
    instead (:func:`disable_ipv6`), so IPv6 egress is never left open; if that fails too, ApplyError.
    """
    chosen = resolve_backend(backend, runner)
    texts: list[tuple[str, str]] = []
    notes: list[str] = []
    for family in (4, 6):
        if family == 6 and not ipv6_conf.is_dir():
            notes.append("this kernel has no IPv6: no IPv6 rules needed")
            continue
        save, restore = commands(chosen, family)
        dump = runner([save], None)
        if dump.returncode != 0 and dry_run:
            notes.append(f"cannot read the current rules ({_failure([save], dump)}): shown as for a namespace "
                         "without egressd's rules")
        if dump.returncode != 0 and not dry_run:
            _unusable(family, [save], dump, rules is not None, ipv6_conf, notes)
            continue
        installed = parse_save(dump.stdout) if dump.returncode == 0 else Installed()
        text = render(rules, family, installed) if rules is not None else render_clean(family, installed)
        argv = [restore, "--noflush", "--wait", "10"]
        texts.append((" ".join(argv), text))
        if dry_run:
            continue
        done = runner(argv, text)
        if done.returncode != 0:
            _unusable(family, argv, done, rules is not None, ipv6_conf, notes)
    return Outcome(chosen, tuple(texts), tuple(notes))


def _unusable(family: int, argv: Sequence[str], result: Result, installing: bool, conf: Path, notes: list) -> None:
    """IPv4 failing is fatal. IPv6 failing turns IPv6 off when installing; when cleaning, a dump that cannot be
    read is a warning (nothing can have been installed with it) and a failed removal is fatal."""
    failure = _failure(argv, result)
    if family == 4 or (not installing and argv[0].endswith("-restore")):
        raise ApplyError(failure)
    if not installing:
        notes.append(f"warning: {failure}; no IPv6 rules removed")
        return
    try:
        off = disable_ipv6(conf)
    except OSError as exc:
        raise ApplyError(f"{failure}; and IPv6 could not be turned off ({exc}), so IPv6 egress would bypass "
                         "egressd: the pod must not start. Run this container privileged (writable /proc/sys) "
                         "or make ip6tables work in it") from None
    notes.append(f"warning: {failure}; IPv6 is turned off on {', '.join(off) or 'no interface'} and for "
                 "interfaces added later, so no IPv6 egress bypasses egressd (loopback keeps ::1)")
