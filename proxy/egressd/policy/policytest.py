"""Policy tests: expectation files (``allowlists/tests/*.yaml``) judged by :func:`egressd.policy.decide.decide`.

Each file is a YAML list of expectations::

    - service: payments-api            # required: a service with a file in the allowlists directory
      destination: api.stripe.com:443  # required: host:port ("[2001:db8::1]:443" for IPv6, quoted)
      expect: allow                    # required: allow or deny
    - service: payments-api
      destination: api.stripe.com:80
      expect: deny
      reason: port_not_allowed         # optional: allowed, denylisted, not_allowlisted or port_not_allowed

An expectation is judged on what enforce mode would do. A service in audit
mode lets through what its allowlist would deny (``would_deny``); here that
counts as a deny, and the report says "(audit mode: would deny)". So a
service's tests keep their meaning when it moves from audit to enforce, and
``mode:`` is not an expectation key: the service file's mode is the one that
applies.

Files are read like the allowlists (:mod:`egressd.policy.nodes`): every value
as text with its line, aliases and duplicate keys refused. Every error in every
file is reported at once, as ``file:line: what is wrong; what to do``, and
nothing is run while there is one. Nothing here matches a name: each
expectation is one call of :func:`~egressd.policy.decide.decide`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from yaml.nodes import Node, SequenceNode

from egressd.hostport import BadDestination, Destination, parse_authority
from egressd.policy.decide import decide
from egressd.policy.model import Decision, Policy, Reason, Verdict
from egressd.policy.nodes import File, LoadError, compose, yaml_files

__all__ = ["TEST_KEYS", "Expectation", "Outcome", "describe", "judge", "load_expectations", "parse_file", "run",
           "summary"]

TEST_KEYS = ("service", "destination", "expect", "reason")
_EXAMPLES = {"service": "payments-api", "destination": "api.stripe.com:443", "expect": "allow"}
_HINTS = {
    "mode": "mode: is not an expectation key: the service file's mode applies, and expect: is judged on what "
    "enforce mode would do; remove mode:",
}
# The reasons decide() gives a known service, by the verdict they go with.
_REASONS = {
    Verdict.ALLOW: (Reason.ALLOWED,),
    Verdict.DENY: (Reason.DENYLISTED, Reason.NOT_ALLOWLISTED, Reason.PORT_NOT_ALLOWED),
}
_POLICY_REASONS = {reason.value: reason for reasons in _REASONS.values() for reason in reasons}
_T = TypeVar("_T")
_EXAMPLE_ITEM = "- {service: payments-api, destination: api.stripe.com:443, expect: allow}"


@dataclass(frozen=True, slots=True)
class Expectation:
    """One entry of an expectation file: what ``service`` connecting to ``destination`` must get."""

    file: str
    line: int
    service: str
    destination: Destination
    expect: Verdict
    reason: Reason | None = None

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """An expectation and the decision :func:`decide` made for it."""

    expectation: Expectation
    decision: Decision

    @property
    def verdict(self) -> Verdict:
        """The verdict enforce mode gives: an audit mode's ``would_deny`` allow counts as a deny."""
        return Verdict.DENY if self.decision.would_deny else self.decision.verdict

    @property
    def passed(self) -> bool:
        expected = self.expectation
        return self.verdict is expected.expect and expected.reason in (None, self.decision.reason)


def judge(policy: Policy, expectation: Expectation) -> Outcome:
    """Decide ``expectation`` with the service's own mode."""
    return Outcome(expectation, decide(policy, expectation.service, expectation.destination))


def run(policy: Policy, expectations: Iterable[Expectation]) -> tuple[Outcome, ...]:
    """Judge every expectation, in the order given."""
    return tuple(judge(policy, expectation) for expectation in expectations)


def describe(outcome: Outcome) -> str:
    """One line: where the expectation is, what was decided, why, and by which rule."""
    expectation, decision = outcome.expectation, outcome.decision
    head = f"{expectation.source}: service {expectation.service} to {expectation.destination.authority}"
    by = f"by rule {decision.source}" if decision.source else "with no matching rule"
    audit = " (audit mode: would deny)" if decision.would_deny else ""
    decided = f"{outcome.verdict.value} ({decision.reason.value}) {by}{audit}"
    if outcome.passed:
        return f"{head}: {decided}, as expected"
    expected = expectation.expect.value + (f" ({expectation.reason.value})" if expectation.reason else "")
    return f"{head}: expected {expected}, decided {decided}"


def summary(outcomes: Collection[Outcome]) -> str:
    passed = sum(outcome.passed for outcome in outcomes)
    return f"{passed} passed, {len(outcomes) - passed} failed"


def load_expectations(
    directory: str | Path, services: Collection[str]
) -> tuple[tuple[Expectation, ...], tuple[LoadError, ...]]:
    """Every expectation in ``directory/*.yaml``, or every error found (then no expectation at all).

    ``services`` are the names of the services the allowlists define; an
    expectation about any other service is an error.
    """
    names, errors = _list_directory(Path(directory))
    expectations: list[Expectation] = []
    for path in names:
        try:
            data = path.read_bytes()
        except OSError as exc:
            errors.append(LoadError(str(path), None, f"cannot read: {exc.strerror}; check the file's permissions"))
            continue
        parsed, file_errors = parse_file(str(path), data, services)
        expectations.extend(parsed)
        errors.extend(file_errors)
    if errors:
        return (), tuple(sorted(errors, key=lambda error: (error.file, error.line or 0)))
    return tuple(expectations), ()


def _list_directory(directory: Path) -> tuple[list[Path], list[LoadError]]:
    """The ``*.yaml`` files to read, sorted, and the errors about the directory's contents."""
    paths, errors = yaml_files(directory, "policy tests directory", "add expectation files there, or pass --tests DIR")
    if not paths and not errors:
        message = f"no policy tests (*.yaml) found; add a file listing expectations, e.g. {_EXAMPLE_ITEM}"
        errors.append(LoadError(str(directory), None, message))
    return paths, errors


def parse_file(
    path: str, data: bytes, services: Collection[str]
) -> tuple[tuple[Expectation, ...], tuple[LoadError, ...]]:
    """The expectations of one file's bytes (``path`` as messages print it), or its errors and none."""
    file = File(path)
    expectations = _parse_file(file, data, frozenset(services))
    return ((), tuple(file.errors)) if file.errors else (tuple(expectations), ())


def _parse_file(file: File, data: bytes, services: frozenset[str]) -> list[Expectation]:
    root = compose(file, data)
    if root is None:
        if file.errors and file.errors[-1].message.startswith("file is empty"):
            file.errors[-1] = LoadError(file.path, 1, f"file is empty; list expectations, e.g. {_EXAMPLE_ITEM}")
        return []
    if not isinstance(root, SequenceNode):
        file.error(root, f"a policy test file is a list of expectations, one per '- ' entry, e.g. {_EXAMPLE_ITEM}")
        return []
    if not root.value:
        file.error(root, "the file lists no expectations; add at least one, or delete the file")
        return []
    parsed = (_parse_expectation(file, item, services) for item in root.value)
    return [expectation for expectation in parsed if expectation is not None]


def _parse_expectation(file: File, node: Node, services: frozenset[str]) -> Expectation | None:
    errors_before = len(file.errors)
    fields = file.mapping(node, "an expectation", TEST_KEYS, _HINTS)
    if fields is None:
        return None
    for key, example in _EXAMPLES.items():
        if key not in fields:
            file.error(node, f"an expectation needs {key}:; add it, e.g. `{key}: {example}`")
    value = {key: value_node for key, (_, value_node) in fields.items()}
    service = _read(file, value, "service", lambda text: _service(text, services))
    destination = _read(file, value, "destination", _destination)
    expect = _read(file, value, "expect", _expect)
    reason = _read(file, value, "reason", _reason)
    if expect is not None and reason is not None and reason not in _REASONS[expect]:
        file.error(value["reason"], _never_holds(expect, reason))
    if len(file.errors) > errors_before or service is None or destination is None or expect is None:
        return None
    return Expectation(file.path, node.start_mark.line + 1, service, destination, expect, reason)


def _read(file: File, value: dict[str, Node], key: str, parse: Callable[[str], _T]) -> _T | None:
    return file.convert(value[key], key, parse) if key in value else None


# Scalar parsers: text in, value out, or ValueError with the whole message (what is wrong; what to write).


def _service(text: str, services: frozenset[str]) -> str:
    if text not in services:
        known = ", ".join(sorted(services))
        raise ValueError(f'service "{text}" has no allowlist file; write one of: {known} (or add {text}.yaml)')
    return text


def _destination(text: str) -> Destination:
    if "*" in text:
        raise ValueError(
            f'destination "{text}" is a pattern; a policy test names one destination, e.g. a.example.com:443 '
            f"(write one expectation per name to check)"
        )
    try:
        return parse_authority(text)
    except BadDestination as exc:
        raise ValueError(
            f'invalid destination: {exc}; a destination is host:port, e.g. api.example.com:443 or "[2001:db8::1]:443"'
        ) from None


def _expect(text: str) -> Verdict:
    if text not in ("allow", "deny"):
        raise ValueError(f'expect "{text}" is not valid; write expect: allow or expect: deny')
    return Verdict(text)


def _reason(text: str) -> Reason:
    if text not in _POLICY_REASONS:
        choices = ", ".join(sorted(_POLICY_REASONS))
        raise ValueError(f'reason "{text}" is not one the policy decides; write one of: {choices}')
    return _POLICY_REASONS[text]


def _never_holds(expect: Verdict, reason: Reason) -> str:
    fitting = ", ".join(reason.value for reason in _REASONS[expect])
    return (
        f"expect: {expect.value} with reason: {reason.value} can never hold (with expect: {expect.value} the reason "
        f"is one of: {fitting}); change expect: or reason:"
    )
