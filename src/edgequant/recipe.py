"""`Recipe`: an ordered list of rules, each mapping a selector to a `Scheme` or to ``None``.

Selectors (one per rule):

- ``module: "layers.0.attention.wq"``: one module, by its exact fully qualified name (FQN);
- ``module: "re:layers\\.[0-3]\\..*"``: every module whose FQN *fully* matches the regex;
- ``role: attention`` with optional ``layers: [0, 1, 29]``: modules of a role (``embedding``,
  ``attention``, ``feedforward``, ``lm_head``, ``norm``), optionally only in those decoder layers;
- ``role: default``: every module (``layers`` may narrow it too).

Precedence, written down once: the most specific matching rule decides, in this order
**exact FQN > regex > role with layer indices > role > default**; among rules of equal rank the
later one wins. A rule whose scheme is ``None`` leaves the module in float.

``rotate: hadamard`` (or ``random``; optional) folds the norms and orthogonal rotations of the
residual stream and the attention values into the float weights before anything is rounded
(`edgequant.rotation`): the float model computes the same function.

File form (JSON or YAML)::

    format: edgequant.recipe
    version: 1
    name: my-recipe
    rules:
      - role: default
        scheme: {weight: int4, granularity: per_group, group_size: 32, activation: int8_dynamic}
      - role: attention
        layers: [0]
        scheme: null
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from edgequant.schemes import Scheme

ROLES = ("default", "embedding", "attention", "feedforward", "lm_head", "norm")
FORMAT = "edgequant.recipe"
VERSION = 1
_RULE_KEYS = ("role", "layers", "module", "scheme")
_TOP_KEYS = ("format", "version", "name", "rotate", "rules")
ROTATIONS = ("hadamard", "random")  # `edgequant.rotation.orthogonal`'s kinds
# Rank of each selector kind; higher is more specific.
RANK = {"fqn": 4, "regex": 3, "role+layers": 2, "role": 1, "default": 0}


def check_rotation(rotate: str | None) -> None:
    """Refuse a ``rotate`` that is neither None nor one of `ROTATIONS`."""
    if rotate is not None and rotate not in ROTATIONS:
        raise ValueError(f"rotate {rotate!r} is not one of {list(ROTATIONS)} (or null)")


@dataclass(frozen=True)
class Rule:
    """One selector -> scheme (``None`` = leave float).

    >>> Rule(Scheme("int8"), role="attention", layers=(0, 1)).kind
    'role+layers'
    >>> Rule(None, module="re:.*\\\\.wq").kind
    'regex'
    """

    scheme: Scheme | None
    role: str | None = None
    layers: tuple[int, ...] | None = None
    module: str | None = None

    def __post_init__(self) -> None:
        if self.scheme is not None and not isinstance(self.scheme, Scheme):
            raise TypeError(f"rule scheme must be a Scheme or None, got {self.scheme!r}")
        if (self.role is None) == (self.module is None):
            raise ValueError(
                "a rule selects by exactly one of 'role' (with optional 'layers') or 'module' "
                f"(an FQN or 're:<regex>'); got role={self.role!r}, module={self.module!r}"
            )
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {list(ROLES)}")
        if self.layers is not None:
            if self.module is not None:
                raise ValueError("'layers' narrows a 'role' rule; it cannot go with 'module'")
            ok = isinstance(self.layers, (list, tuple)) and len(self.layers) > 0
            ok = ok and all(type(i) is int and i >= 0 for i in self.layers)
            if not ok:
                raise ValueError(
                    f"layers must be a non-empty list of indices >= 0, got {self.layers!r}"
                )
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.module is not None:
            if not isinstance(self.module, str) or not self.module.strip():
                raise ValueError(f"module must be an FQN or 're:<regex>', got {self.module!r}")
            if self.module.startswith("re:"):
                try:
                    re.compile(self.module[3:])
                except re.error as e:
                    raise ValueError(f"module regex {self.module[3:]!r} is invalid: {e}") from None

    @property
    def kind(self) -> str:
        """The selector kind: ``fqn``, ``regex``, ``role+layers``, ``role`` or ``default``."""
        if self.module is not None:
            return "regex" if self.module.startswith("re:") else "fqn"
        if self.layers is not None:
            return "role+layers"
        return "default" if self.role == "default" else "role"

    @property
    def rank(self) -> int:
        return RANK[self.kind]

    def selector(self) -> str:
        """Human form of the selector, e.g. ``role=attention layers=[0, 1]``."""
        if self.module is not None:
            return f"module={self.module}"
        text = f"role={self.role}"
        return text + (f" layers={list(self.layers)}" if self.layers is not None else "")

    def matches(self, fqn: str, role: str | None, layer: int | None) -> bool:
        """Whether this rule selects the module ``fqn`` with the given role and layer index."""
        if self.module is not None:
            if self.module.startswith("re:"):
                return re.fullmatch(self.module[3:], fqn) is not None
            return self.module == fqn
        if self.layers is not None and layer not in self.layers:
            return False
        return self.role == "default" or self.role == role

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.module is not None:
            out["module"] = self.module
        else:
            out["role"] = self.role
            if self.layers is not None:
                out["layers"] = list(self.layers)
        out["scheme"] = None if self.scheme is None else self.scheme.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Rule:
        if not isinstance(data, dict):
            raise TypeError(f"{where}: expected a mapping with {list(_RULE_KEYS)}, got {data!r}")
        unknown = sorted(set(data) - set(_RULE_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {list(_RULE_KEYS)}")
        if "scheme" not in data:
            raise ValueError(f"{where}: missing 'scheme' (a scheme mapping, or null for float)")
        raw = data["scheme"]
        scheme = None if raw is None else Scheme.from_dict(raw, where=f"{where}.scheme")
        try:
            return cls(
                scheme=scheme,
                role=data.get("role"),
                layers=data.get("layers"),
                module=data.get("module"),
            )
        except (ValueError, TypeError) as e:
            raise type(e)(f"{where}: {e}") from None


@dataclass(frozen=True)
class Recipe:
    """An ordered list of `Rule`s with one precedence (see the module docstring).

    >>> r = Recipe((Rule(Scheme("int8"), role="default"), Rule(None, role="lm_head")))
    >>> r.resolve("output", "lm_head", None)
    (None, 1)
    >>> r.resolve("layers.0.attention.wq", "attention", 0)[0].describe()
    'int8 per-channel sym'
    """

    rules: tuple[Rule, ...]
    name: str | None = None
    rotate: str | None = None  # one of `ROTATIONS`: rotate the float model first

    def __post_init__(self) -> None:
        check_rotation(self.rotate)
        rules = tuple(self.rules)
        for i, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                raise TypeError(f"rules[{i}] must be a Rule, got {type(rule).__name__}")
        object.__setattr__(self, "rules", rules)

    def resolve(
        self, fqn: str, role: str | None, layer: int | None
    ) -> tuple[Scheme | None, int | None]:
        """``(scheme, index of the deciding rule)``; ``(None, None)`` when no rule matches."""
        best: int | None = None
        for i, rule in enumerate(self.rules):
            if rule.matches(fqn, role, layer) and (
                best is None or rule.rank >= self.rules[best].rank
            ):
                best = i
        return (None, None) if best is None else (self.rules[best].scheme, best)

    def map_schemes(self, fn) -> Recipe:
        """A copy with ``fn(scheme)`` applied to every non-``None`` scheme."""
        rules = tuple(
            r if r.scheme is None else replace(r, scheme=fn(r.scheme)) for r in self.rules
        )
        return replace(self, rules=rules)

    # ---- file form ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        if self.name is not None:
            out["name"] = self.name
        if self.rotate is not None:
            out["rotate"] = self.rotate
        out["rules"] = [r.to_dict() for r in self.rules]
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise TypeError(f"{where}: expected a mapping with 'rules', got {type(data).__name__}")
        unknown = sorted(set(data) - set(_TOP_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {list(_TOP_KEYS)}")
        if data.get("format", FORMAT) != FORMAT:
            raise ValueError(f"{where}: format {data['format']!r} is not {FORMAT!r}")
        version = data.get("version", VERSION)
        if type(version) is not int or version != VERSION:
            raise ValueError(
                f"{where}: version {data['version']!r} is not supported (this edgequant reads "
                f"version {VERSION})"
            )
        if not isinstance(data.get("name", ""), str):
            raise ValueError(f"{where}: name must be a string, got {data['name']!r}")
        rules = data.get("rules")
        if not isinstance(rules, list):
            raise ValueError(f"{where}: 'rules' must be a list of rules, got {rules!r}")
        parsed = tuple(Rule.from_dict(r, where=f"{where}: rules[{i}]") for i, r in enumerate(rules))
        try:
            return cls(rules=parsed, name=data.get("name"), rotate=data.get("rotate"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_json(cls, text: str, where: str = "recipe") -> Recipe:
        from edgequant._io import load_json

        _check_size(text, where)
        data = load_json(text, where, max_depth=MAX_DEPTH)
        _check_tree(data, where)
        return cls.from_dict(data, where=where)

    @classmethod
    def from_yaml(cls, text: str, where: str = "recipe") -> Recipe:
        from edgequant._io import check_nesting

        _check_size(text, where)
        check_nesting(text, where, max_depth=MAX_DEPTH)  # flow collections, before parsing
        try:
            _check_yaml_nodes(yaml.compose(text, Loader=yaml.SafeLoader), where)
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{where}: not valid YAML: {e}") from None
        except RecursionError:
            raise ValueError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
        _check_tree(data, where)
        return cls.from_dict(data, where=where)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a ``.json``, ``.yaml`` or ``.yml`` recipe file."""
        from edgequant._io import read_text_file

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
        text = read_text_file(path, "recipe file", max_bytes=MAX_RECIPE_BYTES)
        if path.suffix == ".json":
            return cls.from_json(text, where=str(path))
        if path.suffix in (".yaml", ".yml"):
            return cls.from_yaml(text, where=str(path))
        raise ValueError(f"recipe file {str(path)!r}: expected a .json, .yaml or .yml suffix")

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write as JSON or YAML (by suffix), atomically; refuses to overwrite unless told."""
        from edgequant._io import atomic_write_text

        path = Path(path)
        if path.suffix not in (".json", ".yaml", ".yml"):
            raise ValueError(f"recipe file {str(path)!r}: expected a .json, .yaml or .yml suffix")
        text = self.to_json() if path.suffix == ".json" else self.to_yaml()
        atomic_write_text(path, text, overwrite=overwrite)
        return path

    def describe(self) -> str:
        """One line per rule: ``[i] selector -> scheme``."""
        lines = []
        for i, r in enumerate(self.rules):
            target = "float (left as is)" if r.scheme is None else r.scheme.describe()
            lines.append(f"[{i}] {r.selector()} -> {target}")
        return "\n".join(lines)


# A recipe is a few rules: these bounds refuse files that could only exhaust memory or the stack
# (a YAML alias bomb expands to billions of nodes from a few hundred bytes).
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 100_000


def _check_size(text: str, where: str) -> None:
    if len(text) > MAX_RECIPE_BYTES:
        raise ValueError(
            f"{where}: {len(text)} characters; a recipe is at most {MAX_RECIPE_BYTES} (a few rules)"
        )


def _check_yaml_nodes(root, where: str) -> None:
    """Refuse a YAML document whose aliases expand to more than `MAX_NODES` nodes, before they
    are expanded (each node's expanded size is computed once)."""
    if root is None:
        return
    sizes: dict[int, int] = {}
    order, stack = [], [(root, 0)]
    while stack:  # children before parents, without recursion
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if id(node) in sizes:
            continue
        sizes[id(node)] = 0
        order.append(node)
        for child in _yaml_children(node):
            stack.append((child, depth + 1))
    for node in reversed(order):
        sizes[id(node)] = 1 + sum(sizes[id(c)] for c in _yaml_children(node))
        if sizes[id(node)] > MAX_NODES:
            raise ValueError(
                f"{where}: expands to more than {MAX_NODES} values (YAML aliases?); a recipe "
                "is a few rules"
            )


def _yaml_children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_tree(data: Any, where: str) -> None:
    """Refuse parsed data nested deeper than `MAX_DEPTH` or holding more than `MAX_NODES`
    values."""
    count, stack = 0, [(data, 0)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise ValueError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if count > MAX_NODES:
            raise ValueError(f"{where}: more than {MAX_NODES} values; a recipe is a few rules")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
