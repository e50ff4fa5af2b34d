"""The patch templates of ``sidecar/``: YAML parsed first, then ``${name}`` placeholders filled inside values.

A placeholder that is a whole plain scalar keeps the value's type (``runAsUser: ${proxy_uid}`` is the number
1337), one inside a string or a quoted scalar is text, and a list placeholder (``${exclude_args}``) stands
alone as a list item and becomes several. Since the structure is fixed before any value goes in, nothing a
pod carries (an annotation, a service name) can add YAML structure. :mod:`egressd.inject` fills them.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from egressd.config import ConfigError

TEMPLATE_FILES = {"init": "init-container.yaml", "sidecar": "sidecar-container.yaml", "volumes": "volumes.yaml"}
SCALAR_PLACEHOLDERS = ("image", "version", "service", "init_container", "sidecar_container", "proxy_uid",
                       "admin_port", "admin_port_name", "transparent_port", "dns_port", "allowlists_configmap",
                       "allowlists_mount")
LIST_PLACEHOLDERS = ("exclude_args",)
_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")


class TemplateError(ConfigError):
    """A template in ``sidecar/`` that cannot be used; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Hole:
    """A placeholder: a whole plain scalar (``value``, keeps its type), in a string (``text``), a list item's."""

    kind: str
    text: str  # the placeholder's name (value, items) or the whole string (text)


@dataclasses.dataclass(frozen=True, slots=True)
class Templates:
    """The compiled templates of ``sidecar/``; :meth:`fill` gives the containers and volumes for one pod."""

    init: Any
    sidecar: Any
    volumes: Any
    volume_names: frozenset[str] = frozenset()  # the volumes the injection adds, which a pod must not have

    def fill(self, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
        return _fill(self.init, values), _fill(self.sidecar, values), _fill(self.volumes, values)


def compile_dir(directory: Path) -> Templates:
    """Parse the three templates of ``directory``; :class:`TemplateError` names the file, the line and the fix."""
    trees = {}
    for key, name in TEMPLATE_FILES.items():
        path = directory / name
        try:
            node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise TemplateError(f"template {path}: {exc}; give --templates the directory holding "
                                f"{', '.join(TEMPLATE_FILES.values())}") from None
        if node is None:
            raise TemplateError(f"template {path} is empty; restore it from the egressd sources (sidecar/)")
        trees[key] = _compile(node, str(path), in_list=False)
    return Templates(trees["init"], trees["sidecar"], trees["volumes"])


def _compile(node: Node, file: str, in_list: bool) -> Any:
    line = node.start_mark.line + 1
    if isinstance(node, MappingNode):
        out: dict[str, Any] = {}
        for key, value in node.value:
            if not isinstance(key, ScalarNode) or key.tag != "tag:yaml.org,2002:str" or "${" in key.value:
                raise TemplateError(f"{file}:{key.start_mark.line + 1}: write keys as plain strings, no placeholders")
            if key.value in out:
                raise TemplateError(f"{file}:{key.start_mark.line + 1}: duplicate key {key.value!r}; keep one")
            out[key.value] = _compile(value, file, in_list=False)
        return out
    if isinstance(node, SequenceNode):
        return [_compile(item, file, in_list=True) for item in node.value]
    assert isinstance(node, ScalarNode)
    names = _PLACEHOLDER.findall(node.value)
    if "${" not in node.value:
        return SafeConstructor().construct_object(node)
    known = SCALAR_PLACEHOLDERS + LIST_PLACEHOLDERS
    unknown = [f"${{{n}}}" for n in names if n not in known]
    if unknown or node.value.count("${") != len(names):
        raise TemplateError(f"{file}:{line}: unknown placeholder {', '.join(unknown) or 'an unclosed ${'}; the "
                            "known ones are " + ", ".join(f"${{{n}}}" for n in known))
    whole = _PLACEHOLDER.fullmatch(node.value)
    listed = [n for n in names if n in LIST_PLACEHOLDERS]
    if listed and not (whole and in_list):
        raise TemplateError(f"{file}:{line}: ${{{listed[0]}}} becomes several list items; write it alone as an "
                            "item of a list")
    if whole and (listed or node.style is None):
        return _Hole("items" if listed else "value", node.value[2:-1])
    return _Hole("text", node.value)


def _fill(tree: Any, values: dict[str, Any]) -> Any:
    if isinstance(tree, dict):
        return {k: _fill(v, values) for k, v in tree.items()}
    if isinstance(tree, list):
        out: list[Any] = []
        for item in tree:
            if isinstance(item, _Hole) and item.kind == "items":
                out.extend(values[item.text])
            else:
                out.append(_fill(item, values))
        return out
    if not isinstance(tree, _Hole):
        return tree
    return values[tree.text] if tree.kind == "value" else _PLACEHOLDER.sub(lambda m: str(values[m[1]]), tree.text)
