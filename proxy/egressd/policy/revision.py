"""One side of ``egressd diff``: an allowlists directory on disk, or the one at a git revision.

A revision is read with git's plumbing (``git rev-parse``, ``git ls-tree``,
``git cat-file``), its files written into a temporary directory that the
loader then reads like any other: nothing is checked out, the work tree and
the index are never touched::

    allowlists/            a directory (what is on disk now)
    origin/main            the revision's allowlists/ (--allowlists-dir, from the repository's top)
    HEAD~1:deploy/lists    the revision's deploy/lists/
    main..feature          (the whole range, as the only argument) main, then feature
    main...feature         the merge base of main and feature, then feature (what a pull request changes)

A name that is both a directory and a revision is refused (``./NAME`` names
the directory), and so is one that is neither, with what git said.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RevisionError", "Snapshot", "snapshot", "split_range"]

GIT_TIMEOUT = 60.0
_REGULAR = ("100644", "100755")


class RevisionError(Exception):
    """A name that is not an allowlists directory or a revision holding one; the message says what to pass."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The allowlists of one side, readable at ``directory``.

    ``name`` is the argument as given; ``commit`` the commit it resolved to
    (None for a directory). The loader names files under ``directory``;
    :meth:`show` rewrites such text to name them as the repository does
    (``allowlists/payments-api.yaml:9``).
    """

    name: str
    directory: Path
    commit: str | None = None
    shown: str = ""  # the path in the repository; "" for a directory, printed as given
    title: str = ""  # how a title names the side, when not by ``name`` (the merge base of a range)

    def show(self, text: str) -> str:
        if self.commit is None:
            return text
        return text.replace(f"{self.directory}/", f"{self.shown}/").replace(str(self.directory), self.shown)

    @property
    def label(self) -> str:
        """How the side is named in a title: the name, and the short commit for a revision."""
        name = self.title or self.name
        return name if self.commit is None else f"{name} ({self.commit[:12]})"


def split_range(text: str, cwd: Path | None = None) -> tuple[str, str, str]:
    """``A..B`` -> (A, B, "") and ``A...B`` -> (the merge base of A and B, B, a title for it), as ``git diff``.

    An empty side is HEAD, as in git.
    """
    three = "..." in text
    old, _, new = text.partition("..." if three else "..")
    old, new = old or "HEAD", new or "HEAD"
    if not three:
        return old, new, ""
    fix = "the two have no common history; diff them as OLD NEW instead"
    base = _git(["merge-base", _commit(old, cwd), _commit(new, cwd)], cwd, f'"{text}" has no merge base', fix)
    return base.decode().strip(), new, f"the merge base of {old} and {new}"


@contextmanager
def snapshot(
    name: str, allowlists_dir: str = "allowlists", cwd: Path | None = None, title: str = ""
) -> Iterator[Snapshot]:
    """The allowlists named by ``name`` (a directory, ``REV`` or ``REV:PATH``), readable while the block runs."""
    here = Path(cwd) if cwd is not None else Path.cwd()
    if name.startswith("-") or not name:
        raise RevisionError(f'"{name}" is not a directory or a git revision; pass one, e.g. allowlists or origin/main')
    directory = here / name
    if directory.is_dir():
        if ":" not in name and _is_commit(name, here):
            raise RevisionError(
                f'"{name}" is both a directory and a git revision; write ./{name} for the directory '
                f"or {name}^{{commit}} for the revision"
            )
        yield Snapshot(name, Path(name) if cwd is None else directory)
        return
    rev, colon, path = name.partition(":")
    path = (path if colon else allowlists_dir).strip("/") or "."
    commit = _commit(rev, here, directory_too=True)
    with tempfile.TemporaryDirectory(prefix="egressd-diff-") as tmp:
        target = Path(tmp) / "allowlists"
        _write_tree(commit, path, name, here, target)
        yield Snapshot(name, target, commit, path, title)


def _commit(rev: str, cwd: Path | None, directory_too: bool = False) -> str:
    """The commit ``rev`` names, or RevisionError saying that it is neither a directory nor a revision."""
    if rev.startswith("-") or not rev:
        raise RevisionError(f'"{rev}" is not a git revision; name a branch, tag or commit, e.g. origin/main')
    what = "neither a directory nor a git revision" if directory_too else "not a git revision"
    fix = "pass an allowlists directory or a revision such as origin/main or HEAD~1"
    out = _git(["rev-parse", "--verify", "--end-of-options", f"{rev}^{{commit}}"], cwd, f'"{rev}" is {what}', fix)
    return out.decode().strip()


def _is_commit(rev: str, cwd: Path) -> bool:
    try:
        _commit(rev, cwd)
    except RevisionError:
        return False
    return True


def _write_tree(commit: str, path: str, name: str, cwd: Path, target: Path) -> None:
    """Write the files of directory ``path`` at ``commit`` (not its subdirectories' files) into ``target``."""
    missing = f"{name} has no directory {path}/"
    tree = f"{commit}:{'' if path == '.' else path}"  # an empty path is the top; "." would be the current directory
    fix = "pass --allowlists-dir with the directory that holds the allowlists, or REV:PATH"
    kind = _git(["cat-file", "-t", tree], cwd, missing, fix).decode().strip()
    if kind != "tree":
        raise RevisionError(f"{missing} ({path} is a {kind}); {fix}")
    target.mkdir()
    listing = _git(["ls-tree", "-z", tree], cwd, missing, fix)
    for entry in filter(None, listing.split(b"\0")):
        meta, _, raw = entry.partition(b"\t")
        mode, kind, sha = meta.decode().split()
        file = raw.decode("utf-8", "surrogateescape")
        if file in ("", ".", "..") or "/" in file:
            raise RevisionError(f"{name}: {path}/ holds an entry named {file!r}, which is not a file name")
        if kind == "tree":
            (target / file).mkdir()  # the loader skips subdirectories; kept so the layout is the same
        elif kind == "blob" and mode in _REGULAR:
            (target / file).write_bytes(_git(["cat-file", "blob", sha], cwd, f"{name}: cannot read {path}/{file}"))
        elif kind == "blob":
            raise RevisionError(
                f"{name}: {path}/{file} is a symbolic link; an allowlist must be a regular file, so replace the "
                "link by the file itself"
            )


def _git(args: list[str], cwd: Path | None, what: str, fix: str = "check the repository") -> bytes:
    """git's output, or RevisionError ``what (git: its message); fix``."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=GIT_TIMEOUT, check=False)
    except FileNotFoundError:
        raise RevisionError(f"{what}: git is not installed; install git, or pass two directories") from None
    except subprocess.TimeoutExpired:
        raise RevisionError(f"{what}: git did not answer within {GIT_TIMEOUT:.0f} s; {fix}") from None
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        detail = f" (git: {said[0].removeprefix('fatal: ')})" if said else ""
        raise RevisionError(f"{what}{detail}; {fix}")
    return done.stdout
