"""``python -m bench.matching [PROXY_DIR ...]``: the cost of one host lookup in a RuleSet, per host shape.

Builds one rule set of 300 exact names, 100 ``*.`` and 50 ``**.`` wildcards (and, in a second row, the same
plus 50 mid-name wildcards such as ``ec2.*.svc7.example.net``) and times ``RuleSet.match_host`` for five
hosts: an exact hit, a ``*.`` hit, a ``**.`` hit and two misses. Each PROXY_DIR (a checkout's ``proxy/``,
e.g. an older revision's from ``git worktree``) is timed in its own interpreter, one after the other in the
same run, so two revisions compare side by side. Run it pinned to one core: ``taskset -c 1 python -m
bench.matching``.
"""

from __future__ import annotations

import subprocess
import sys
import timeit
from pathlib import Path

HOSTS = ("api17.example3.com", "x.svc42.example.net", "a.b.deep7.example.org", "nothing.here.example.io",
         "www.google.com")
ROUNDS, REPEATS = 200_000, 7


def measure(mid: bool) -> list[float]:
    """Nanoseconds per lookup of each of HOSTS (best of REPEATS)."""
    from egressd.policy.match import RuleSet, parse_pattern
    from egressd.policy.model import Rule

    patterns = [f"api{i}.example{i % 7}.com" for i in range(300)]
    patterns += [f"*.svc{i}.example.net" for i in range(100)] + [f"**.deep{i}.example.org" for i in range(50)]
    if mid:
        patterns += [f"ec2.*.svc{i}.example.net" for i in range(50)]
    rules = RuleSet(Rule(source=f"bench.yaml:{n}", host=parse_pattern(p)) for n, p in enumerate(patterns, 1))
    return [min(timeit.repeat(lambda h=host: rules.match_host(h), number=ROUNDS, repeat=REPEATS)) / ROUNDS * 1e9
            for host in HOSTS]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--measure"]:
        print(" ".join(f"{ns:.0f}" for ns in measure(argv[1] == "mid")))
        return 0
    trees = argv or [str(Path(__file__).resolve().parents[1] / "proxy")]
    print(f"{'proxy tree':40} {'rules':10} " + " ".join(f"{h:>24}" for h in HOSTS))
    for tree in trees:
        for kind in ("plain", "mid"):
            code = f"import sys; sys.path.insert(0, {tree!r}); from bench.matching import main; main(sys.argv[1:])"
            out = subprocess.run([sys.executable, "-c", code, "--measure", kind], capture_output=True, text=True,
                                 cwd=Path(__file__).resolve().parents[1], timeout=600)
            cells = [f"{c} ns" for c in out.stdout.split()] if out.returncode == 0 else ["refused"] * len(HOSTS)
            print(f"{tree:40} {kind:10} " + " ".join(f"{c:>24}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
