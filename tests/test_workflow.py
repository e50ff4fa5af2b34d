"""The allowlists pull-request workflow and CODEOWNERS: GitHub's schema, the commands they run, the comment script."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from egressd.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "allowlists.yml"
CODEOWNERS = ROOT / ".github" / "CODEOWNERS"
BIN = Path(sys.executable).parent
MARKER = "<!-- egressd-allowlist-diff -->"


def load_workflow(path: Path = WORKFLOW) -> dict:
    # PyYAML reads the key `on` as True (YAML 1.1); GitHub reads it as "on".
    data = yaml.safe_load(path.read_text())
    data["on"] = data.pop(True)
    return data


def steps() -> list[dict]:
    return load_workflow()["jobs"]["allowlists"]["steps"]


def step(step_id: str) -> dict:
    return next(s for s in steps() if s.get("id") == step_id)


def schema_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True, text=True, timeout=120,
    )


# --- the workflow file ----------------------------------------------------------------------------------------------

def test_workflow_matches_githubs_schema():
    """The workflow validates against GitHub's workflow schema (vendored in check-jsonschema, offline)."""
    out = schema_check(WORKFLOW)
    assert (out.returncode, out.stdout.strip()) == (0, "ok -- validation done"), out.stdout + out.stderr


def test_schema_check_refuses_a_broken_workflow(tmp_path):
    """The same check fails on a workflow whose job lacks runs-on, so a pass above means something."""
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("    runs-on: ubuntu-latest\n", ""))
    out = schema_check(broken)
    assert out.returncode == 1 and "Schema validation errors were encountered" in out.stdout + out.stderr


def test_trigger_and_permissions():
    """Only pull requests touching allowlists/ run it, with a read-only checkout and the right to comment."""
    workflow = load_workflow()
    assert workflow["on"] == {"pull_request": {"paths": ["allowlists/**"]}}
    assert workflow["permissions"] == {"contents": "read", "pull-requests": "write"}
    assert "permissions" not in workflow["jobs"]["allowlists"]


def test_actions_are_pinned_by_major_version():
    """Every action is an owner/name@vN reference, and checkout fetches the whole history for the diff."""
    uses = [s["uses"] for s in steps() if "uses" in s]
    assert uses == ["actions/checkout@v4", "actions/setup-python@v5", "actions/github-script@v7"]
    assert steps()[0]["with"] == {"fetch-depth": 0}
    assert steps()[1]["with"] == {"python-version": "3.12"}


def egressd_commands() -> list[tuple[str, list[str]]]:
    """Each ``egressd …`` command of the run scripts, by step id, as argv with the step's env expanded for a base."""
    found = []
    for s in steps():
        for line in s.get("run", "").splitlines():
            line = line.strip()
            if not line.startswith("egressd "):
                continue
            line = line.split(" > ")[0].split(" || ")[0].replace("$BASE_REF", "main")
            found.append((s.get("id", s["name"]), shlex.split(line)))
    return found


def test_workflow_runs_exactly_these_commands():
    """validate (errors fail, warnings annotate), test, and diff from the merge base with the base branch to HEAD as
    markdown, in order."""
    assert egressd_commands() == [
        ("validate", ["egressd", "validate", "allowlists", "--format", "github"]),
        ("test", ["egressd", "test", "allowlists"]),
        ("diff", ["egressd", "diff", "origin/main...HEAD", "--format", "markdown"]),
    ]
    assert step("diff")["env"] == {"BASE_REF": "${{ github.base_ref }}"}
    assert any(s.get("run") == "python -m pip install ." for s in steps())


@pytest.mark.parametrize(("step_id", "argv"), egressd_commands(), ids=[c[0] for c in egressd_commands()])
def test_commands_parse_with_egressds_own_parser(step_id, argv):
    """Every command the workflow runs is accepted by egressd's command-line parser, with the meaning intended."""
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"egressd's parser refuses the {step_id} step's command {shlex.join(argv)} (exit {exc.code})")
    assert args.command == argv[1]
    if step_id == "validate":
        assert (args.path, args.strict, args.format) == ("allowlists", False, "github")
    elif step_id == "test":
        assert (args.path, args.tests, args.verbose) == ("allowlists", None, False)
    else:
        assert (args.old, args.new, args.format) == ("origin/main...HEAD", None, "markdown")  # from the merge base


def test_later_steps_run_after_a_failure():
    """The tests, the diff and the comment run even when validation failed, so the comment is never stale."""
    assert "if" not in step("validate")
    for step_id in ("test", "diff"):
        assert step(step_id)["if"] == "${{ !cancelled() }}"
    comment = steps()[-1]
    assert comment["if"].startswith("${{ !cancelled() && ")


@pytest.mark.parametrize("step_id", ["validate", "test"])
def test_step_passes_on_this_repository(step_id):
    """The validate and test steps, run here as the workflow runs them, pass on the repository's own allowlists."""
    out = subprocess.run(
        ["bash", "-e", "-c", step(step_id)["run"]], capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    )
    assert out.returncode == 0, out.stdout + out.stderr


# --- the diff step, on a real git repository ------------------------------------------------------------------------

def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, timeout=60,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"})


def pull_request(tmp_path: Path, change: str | None) -> Path:
    """A repository whose origin/main has the shipped allowlists and whose HEAD adds ``change`` to payments-api."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "allowlists", repo / "allowlists")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    git(repo, "update-ref", "refs/remotes/origin/main", "HEAD")
    if change is not None:
        path = repo / "allowlists" / "payments-api.yaml"
        path.write_text(path.read_text() + change)
        git(repo, "commit", "-q", "-am", "change")
    return repo


def run_diff_step(repo: Path) -> tuple[int, str, str, str]:
    """Run the diff step's script as GitHub does (bash -e); its exit code, step outputs, summary and stderr."""
    output, summary = repo.parent / "output", repo.parent / "summary"
    out = subprocess.run(
        ["bash", "-e", "-c", step("diff")["run"]], capture_output=True, text=True, timeout=120, cwd=repo,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "BASE_REF": "main",
             "GITHUB_OUTPUT": str(output), "GITHUB_STEP_SUMMARY": str(summary)},
    )
    read = lambda path: path.read_text() if path.exists() else ""  # noqa: E731
    return out.returncode, read(output), read(summary), out.stderr


@pytest.mark.parametrize(("change", "widened"), [
    pytest.param('  - host: "*.stripe.com"\n', "true", id="widened"),
    pytest.param(None, "false", id="unchanged"),
])
def test_diff_step_on_a_pull_request(tmp_path, change, widened):
    """The diff step succeeds whether or not the change widens, says which, and puts the diff in the summary."""
    code, outputs, summary, stderr = run_diff_step(pull_request(tmp_path, change))
    assert (code, outputs) == (0, f"widened={widened}\n"), stderr
    assert summary.strip()
    assert ("*.stripe.com" in summary) == (widened == "true")


def test_diff_step_fails_when_the_allowlists_do_not_load(tmp_path):
    """An allowlist that does not load at HEAD fails the diff step (exit 1) and sets no output."""
    code, outputs, _, stderr = run_diff_step(pull_request(tmp_path, '  - host: "*.com"\n'))
    assert (code, outputs) == (1, "")
    assert "payments-api.yaml" in stderr


# --- the comment script ---------------------------------------------------------------------------------------------

NODE_HARNESS = """
const fs = require('fs');
const existing = JSON.parse(process.argv[3]);
const calls = [];
const github = {
  paginate: async (method, params) => { calls.push(['list', params]); return existing; },
  rest: { issues: {
    listComments: 'listComments',
    updateComment: async (params) => { calls.push(['update', params]); },
    createComment: async (params) => { calls.push(['create', params]); },
  } },
};
const context = { repo: { owner: 'acme', repo: 'egress' }, issue: { number: 7 } };
const AsyncFunction = Object.getPrototypeOf(async function () {}).constructor;
new AsyncFunction('require', 'github', 'context', fs.readFileSync(process.argv[2], 'utf8'))(require, github, context)
  .then(() => console.log(JSON.stringify(calls)));
"""
RUN_URL = "https://github.com/acme/egress/actions/runs/1"
ENV = {"VALIDATE": "success", "TESTS": "failure", "DIFF": "success", "WIDENED": "true", "RUN_URL": RUN_URL}


def run_comment_script(tmp_path: Path, existing: list[dict], env: dict[str, str], diff: str | None) -> list:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (apt-get install nodejs): the comment script cannot be run here")
    comment = steps()[-1]
    assert comment["uses"] == "actions/github-script@v7"
    (tmp_path / "script.js").write_text(comment["with"]["script"])
    (tmp_path / "harness.js").write_text(NODE_HARNESS)
    if diff is not None:
        (tmp_path / "diff.md").write_text(diff)
    out = subprocess.run([node, "harness.js", "script.js", json.dumps(existing)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


STATUS = f"validate: **success** · policy tests: **failure** · widened: **yes** · [run]({RUN_URL})"
LIST = ["list", {"owner": "acme", "repo": "egress", "issue_number": 7, "per_page": 100}]


def test_comment_is_created_once(tmp_path):
    """With no earlier comment of the bot, the script creates one: marker, the diff, then how each step went."""
    human = {"id": 1, "user": {"type": "User"}, "body": f"quoting {MARKER}"}
    calls = run_comment_script(tmp_path, [human], ENV, "## diff\n")
    body = f"{MARKER}\n## diff\n\n\n{STATUS}\n"
    assert calls == [LIST, ["create", {"owner": "acme", "repo": "egress", "issue_number": 7, "body": body}]]


def test_comment_is_updated_in_place(tmp_path):
    """With an earlier comment of the bot carrying the marker, the script updates that comment instead."""
    ours = {"id": 42, "user": {"type": "Bot"}, "body": f"{MARKER}\nold"}
    other = {"id": 5, "user": {"type": "Bot"}, "body": "another bot"}
    calls = run_comment_script(tmp_path, [other, ours], ENV, "## diff\n")
    assert calls == [LIST, ["update", {"owner": "acme", "repo": "egress", "comment_id": 42,
                                       "body": f"{MARKER}\n## diff\n\n\n{STATUS}\n"}]]


def test_comment_says_when_the_diff_failed(tmp_path):
    """When the diff step failed, the comment says the reach is unknown instead of keeping an outdated diff."""
    env = {**ENV, "DIFF": "failure", "WIDENED": ""}
    calls = run_comment_script(tmp_path, [], env, None)
    body = calls[1][1]["body"]
    assert body.startswith(f"{MARKER}\n**egressd diff failed** (failure): what this change opens up is not known")
    assert "widened: **unknown**" in body


def test_long_diff_is_cut_below_githubs_limit(tmp_path):
    """A diff longer than a comment may hold is cut, pointing to the run's summary for the rest."""
    calls = run_comment_script(tmp_path, [], ENV, "x" * 70000)
    body = calls[1][1]["body"]
    assert len(body) < 65536 and f"the whole diff is in the [run's summary]({RUN_URL})" in body


# --- CODEOWNERS -----------------------------------------------------------------------------------------------------

def owners(path: str) -> list[str]:
    """The owners GitHub requests for ``path``: the last CODEOWNERS line whose (anchored) pattern matches it."""
    found: list[str] = []
    for line in CODEOWNERS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        pattern, *teams = line.split()
        assert pattern.startswith("/"), f"unanchored pattern {pattern}: this check handles anchored ones only"
        prefix = pattern[1:]
        if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
            found = teams
    return found


@pytest.mark.parametrize("path", [
    "allowlists/payments-api.yaml", "allowlists/_global.yaml", "allowlists/tests/payments-api.yaml",
    "allowlists/kustomization.yaml", ".github/workflows/allowlists.yml", ".github/CODEOWNERS",
])
def test_security_team_owns_the_allowlists(path):
    """Every allowlist file, its tests, the workflow and CODEOWNERS itself need the security team's review."""
    assert owners(path) == ["@egressd/security"]


def test_codeowners_leaves_the_code_alone():
    """The proxy's own code is not routed to the security team by these rules."""
    assert owners("proxy/egressd/app.py") == []
    assert re.search(r"^/allowlists/ @egressd/security$", CODEOWNERS.read_text(), re.MULTILINE)
