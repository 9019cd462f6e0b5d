"""Selection criteria: AGATA-style boolean expressions over device info, evaluated safely.

    data_quantity >= 100 and memory_mb > 512 and has("torch>=2.2")
    region in ["eu", "br"] and not info["battery_low"]

Parsed once with ``ast`` (at create/update, so a bad criterion is refused with the position of
the error), checked against a small whitelist of node types, and compiled into nested Python
closures -- never ``eval``: selection evaluates every running task's criteria for every device
request, and a closure tree costs a fraction of re-walking the syntax tree.  ``interpret`` walks
the tree directly; it is the reference the compiled form is tested against.  There is
no attribute access, no call outside ``has``/``get``/``len``/``lower``, no comprehension or lambda,
and the size and depth of an expression are bounded.  A criterion that fails at evaluation (a
type mismatch against one device's info) is simply false for that device.
"""

from __future__ import annotations

import ast
import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

MAX_LENGTH = 2000
MAX_NODES = 200
MAX_DEPTH = 16
MAX_COLLECTION = 64

_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}
_ALLOWED = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.Compare,
            ast.Name, ast.Load, ast.Constant, ast.List, ast.Tuple, ast.Call, ast.Subscript,
            *_COMPARE)
FUNCTIONS = ("has", "get", "len", "lower")


class CriteriaError(ValueError):
    def __init__(self, message: str, position: int | None = None) -> None:
        where = f" at position {position}" if position is not None else ""
        super().__init__(f"invalid criteria{where}: {message}")
        self.position = position


class _EvalError(Exception):
    pass


@functools.lru_cache(maxsize=4096)
def _requirement(spec: str) -> Requirement | None:
    try:
        return Requirement(spec)
    except InvalidRequirement:
        return None


@functools.lru_cache(maxsize=4096)
def _satisfies(spec: str, version: str) -> bool:
    requirement = _requirement(spec)
    if requirement is None:
        return False
    try:
        return requirement.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def has_package(packages: Any, spec: str) -> bool:
    """``has("torch>=2.2")``: the device reports the package at a version the spec admits."""
    requirement = _requirement(spec) if isinstance(spec, str) else None
    if not isinstance(packages, dict) or requirement is None:
        return False
    version = packages.get(requirement.name) or packages.get(requirement.name.lower())
    return isinstance(version, str) and _satisfies(spec, version)


Facts = dict[str, Any]
Compiled = Callable[[Facts], Any]
_FAILURES = (_EvalError, TypeError, ValueError, KeyError, IndexError, RecursionError)


@dataclass(frozen=True)
class Criteria:
    source: str
    tree: ast.Expression | None
    compiled: Compiled | None = None

    def matches(self, info: Facts) -> bool:
        """A criterion that fails on this device's facts (a type mismatch) is false for it."""
        if self.compiled is None:
            return True
        try:
            return bool(self.compiled(info))
        except _FAILURES:
            return False

    def interpret(self, info: Facts) -> bool:
        """``matches`` by walking the tree: the reference semantics."""
        if self.tree is None:
            return True
        try:
            return bool(_evaluate(self.tree.body, info))
        except _FAILURES:
            return False

    def explain(self, info: Facts) -> tuple[bool, str]:
        """Whether the expression holds, and why in words a person reads in a timeline:
        ``(False, "accuracy 0.41 < 0.85")``, ``(True, "accuracy 0.93 >= 0.85")`` -- the values it
        compared, the comparison that decided (negated when it failed).  For the lifecycle's
        decisions (register_if over a run's metrics, a deployment's health over a device's)."""
        if self.tree is None:
            return True, "no condition"
        try:
            return _explain(self.tree.body, info)
        except _FAILURES as exc:
            return False, f"{self.source.strip()} cannot be evaluated ({exc})"


def _check(node: ast.AST, depth: int, counter: list[int]) -> None:
    counter[0] += 1
    if counter[0] > MAX_NODES:
        raise CriteriaError(f"expression has more than {MAX_NODES} parts", getattr(node, "col_offset", None))
    if depth > MAX_DEPTH:
        raise CriteriaError(f"expression nests deeper than {MAX_DEPTH}", getattr(node, "col_offset", None))
    position = getattr(node, "col_offset", None)
    if not isinstance(node, _ALLOWED):
        raise CriteriaError(f"{type(node).__name__} is not allowed (only comparisons, and/or/not, "
                            f"names, literals and {', '.join(FUNCTIONS)}())", position)
    if isinstance(node, ast.Name) and node.id.startswith("_"):
        raise CriteriaError(f"name {node.id!r} is not allowed", position)
    if isinstance(node, ast.Constant) and not isinstance(node.value, (str, int, float, bool, type(None))):
        raise CriteriaError("only str, number, bool and None literals are allowed", position)
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
            raise CriteriaError(f"only calls to {', '.join(FUNCTIONS)}() with plain arguments are allowed", position)
        for arg in node.args:
            _check(arg, depth + 1, counter)
        return
    if isinstance(node, ast.Subscript):
        if not isinstance(node.slice, ast.Constant) or not isinstance(node.slice.value, (str, int)):
            raise CriteriaError("subscripts must be a literal key, like info[\"gpu\"]", position)
    if isinstance(node, (ast.List, ast.Tuple)) and len(node.elts) > MAX_COLLECTION:
        raise CriteriaError(f"lists may hold at most {MAX_COLLECTION} items", position)
    for child in ast.iter_child_nodes(node):
        _check(child, depth + 1, counter)


@functools.lru_cache(maxsize=1024)  # a device re-reads the same announced criteria every cycle
def parse_criteria(source: str) -> Criteria:
    """Validate once; raises ``CriteriaError`` with the position of the problem."""
    if not isinstance(source, str):
        raise CriteriaError("criteria must be a string")
    if not source.strip():
        return Criteria("", None)
    if len(source) > MAX_LENGTH:
        raise CriteriaError(f"criteria longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise CriteriaError(exc.msg, (exc.offset or 1) - 1) from None
    except (RecursionError, MemoryError, ValueError):
        raise CriteriaError("expression too deeply nested") from None
    _check(tree, 0, [0])
    return Criteria(source, tree, _compile(tree.body))


def _evaluate(node: ast.AST, info: dict[str, Any]) -> Any:
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            result: Any = True
            for value in node.values:
                result = _evaluate(value, info)
                if not result:
                    return result
            return result
        result = False
        for value in node.values:
            result = _evaluate(value, info)
            if result:
                return result
        return result
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, info)
        return (not operand) if isinstance(node.op, ast.Not) else -operand
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, info)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = _evaluate(comparator, info)
            if (left is None or right is None) and isinstance(op, (ast.Lt, ast.LtE, ast.Gt, ast.GtE)):
                return False  # an unknown fact never satisfies an ordering
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Name):
        return info if node.id == "info" else info.get(node.id)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_evaluate(e, info) for e in node.elts]
    if isinstance(node, ast.Subscript):
        container = _evaluate(node.value, info)
        key = node.slice.value  # type: ignore[attr-defined]
        if isinstance(container, dict):
            return container.get(key)
        if isinstance(container, list) and isinstance(key, int) and -len(container) <= key < len(container):
            return container[key]
        return None
    if isinstance(node, ast.Call):
        return _call(node.func.id, [_evaluate(a, info) for a in node.args], info)  # type: ignore[attr-defined]
    raise _EvalError(type(node).__name__)


_NEGATED = {ast.Eq: "!=", ast.NotEq: "==", ast.Lt: ">=", ast.LtE: ">", ast.Gt: "<=", ast.GtE: "<",
            ast.In: "not in", ast.NotIn: "in"}
_SYMBOL = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
           ast.In: "in", ast.NotIn: "not in"}


def _shown(value: Any, exact: bool = False) -> str:
    if isinstance(value, float):
        return repr(value) if exact else f"{value:.6g}"
    return repr(value) if isinstance(value, str) else str(value)


def _operand(node: ast.AST, value: Any, exact: bool = False) -> str:
    """A literal as itself, anything else as its text and the value it had: ``accuracy 0.41``."""
    return _shown(value, exact) if isinstance(node, ast.Constant) else f"{ast.unparse(node)} {_shown(value, exact)}"


def _comparison(left_node: ast.AST, left: Any, symbol: str, right_node: ast.AST, right: Any) -> str:
    """``accuracy 0.41 < 0.85``; in full when rounding would show two different numbers alike."""
    exact = left != right and _shown(left) == _shown(right)
    return f"{_operand(left_node, left, exact)} {symbol} {_operand(right_node, right, exact)}"


def _explain(node: ast.AST, info: Facts) -> tuple[bool, str]:
    """``_evaluate``'s verdict with the parts that decided it (the same semantics)."""
    if isinstance(node, ast.BoolOp):
        parts = [_explain(value, info) for value in node.values]
        wanted = not isinstance(node.op, ast.And)  # the verdict one part alone decides
        deciding = [why for ok, why in parts if ok is wanted]
        if deciding:
            return wanted, deciding[0] if wanted else " and ".join(deciding)
        return not wanted, " and ".join(why for _, why in parts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        ok, why = _explain(node.operand, info)
        return not ok, f"not ({why})"
    if isinstance(node, ast.Compare):
        left_node, left = node.left, _evaluate(node.left, info)
        said = []
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = _evaluate(comparator, info)
            ordering = isinstance(op, (ast.Lt, ast.LtE, ast.Gt, ast.GtE))
            if ordering and (left is None or right is None):
                missing = left_node if left is None else comparator
                return False, f"{ast.unparse(missing)} not reported"
            if not _COMPARE[type(op)](left, right):
                return False, _comparison(left_node, left, _NEGATED[type(op)], comparator, right)
            said.append(_comparison(left_node, left, _SYMBOL[type(op)], comparator, right))
            left_node, left = comparator, right
        return True, " and ".join(said)
    value = _evaluate(node, info)
    return bool(value), f"{ast.unparse(node)} is {_shown(value)}"


# --- the compiled form: the same semantics as _evaluate, decided once per node ---------------------
def _compile(node: ast.AST) -> Compiled:
    if isinstance(node, ast.BoolOp):
        parts = [_compile(v) for v in node.values]
        if isinstance(node.op, ast.And):
            def all_of(info: Facts) -> Any:
                result: Any = True
                for part in parts:
                    result = part(info)
                    if not result:
                        return result
                return result
            return all_of

        def any_of(info: Facts) -> Any:
            result: Any = False
            for part in parts:
                result = part(info)
                if result:
                    return result
            return result
        return any_of
    if isinstance(node, ast.UnaryOp):
        operand = _compile(node.operand)
        if isinstance(node.op, ast.Not):
            return lambda info: not operand(info)
        return lambda info: -operand(info)
    if isinstance(node, ast.Compare):
        left_of = _compile(node.left)
        steps = [(_COMPARE[type(op)], isinstance(op, (ast.Lt, ast.LtE, ast.Gt, ast.GtE)), _compile(c))
                 for op, c in zip(node.ops, node.comparators, strict=True)]

        def compare(info: Facts) -> bool:
            left = left_of(info)
            for test, ordering, right_of in steps:
                right = right_of(info)
                if ordering and (left is None or right is None):
                    return False  # an unknown fact never satisfies an ordering
                if not test(left, right):
                    return False
                left = right
            return True
        return compare
    if isinstance(node, ast.Name):
        name = node.id
        if name == "info":
            return lambda info: info
        return lambda info: info.get(name)
    if isinstance(node, ast.Constant):
        value = node.value
        return lambda info: value
    if isinstance(node, (ast.List, ast.Tuple)):
        elements = [_compile(e) for e in node.elts]
        if all(isinstance(e, ast.Constant) for e in node.elts):
            constant = [e.value for e in node.elts]  # type: ignore[attr-defined]
            return lambda info: list(constant)
        return lambda info: [e(info) for e in elements]
    if isinstance(node, ast.Subscript):
        container_of = _compile(node.value)
        key = node.slice.value  # type: ignore[attr-defined]

        def item(info: Facts) -> Any:
            container = container_of(info)
            if isinstance(container, dict):
                return container.get(key)
            if isinstance(container, list) and isinstance(key, int) and -len(container) <= key < len(container):
                return container[key]
            return None
        return item
    if isinstance(node, ast.Call):
        return _compile_call(node.func.id, [_compile(a) for a in node.args])  # type: ignore[attr-defined]
    raise CriteriaError(f"{type(node).__name__} is not allowed")  # _check refused it already


def _compile_call(name: str, args: list[Compiled]) -> Compiled:
    return lambda info: _call(name, [a(info) for a in args], info)


def _call(name: str, args: list[Any], info: Facts) -> Any:
    """The four functions criteria may call, on evaluated arguments."""
    if name == "has" and len(args) == 1 and isinstance(args[0], str):
        return has_package(info.get("packages"), args[0])
    if name == "get" and 1 <= len(args) <= 2 and isinstance(args[0], str):
        return info.get(args[0], args[1] if len(args) == 2 else None)
    if name == "len" and len(args) == 1 and isinstance(args[0], (str, list, dict)):
        return len(args[0])
    if name == "lower" and len(args) == 1 and isinstance(args[0], str):
        return args[0].lower()
    raise _EvalError(f"bad call to {name}")


def requirements_met(requirements: dict[str, Any], info: dict[str, Any]) -> tuple[bool, str]:
    """Match a task's requirements against what a device reports; (ok, why not).  Requirements of
    the wrong shape (stored before a check, or hostile) are unmet, never an exception."""
    for key in ("packages", "accelerators"):
        if not isinstance(requirements.get(key) or [], list):
            return False, f"needs {key} {requirements.get(key)!r} (not a list)"
    for spec in requirements.get("packages") or []:
        if not has_package(info.get("packages"), spec):
            return False, f"needs {spec}"
    python = requirements.get("python")
    if python is not None and not isinstance(python, str):  # a spec is text: anything else is unmeetable
        return False, f"needs Python {python!r} (not a version specifier)"
    if python:
        try:
            from packaging.specifiers import SpecifierSet

            if not SpecifierSet(python).contains(Version(str(info.get("python", "0"))), prereleases=True):
                return False, f"needs Python {python}"
        except (InvalidVersion, ValueError):
            return False, f"needs Python {python}"
    memory = requirements.get("memory_mb")
    if memory is not None:
        have = info.get("memory_mb")
        if not isinstance(memory, (int, float)) or isinstance(memory, bool):
            return False, f"needs {memory!r} MB of memory (not a number)"
        if not isinstance(have, (int, float)) or have < memory:
            return False, f"needs {memory} MB of memory"
    accelerators = info.get("accelerators")
    for accelerator in requirements.get("accelerators") or []:
        if not isinstance(accelerators, list) or accelerator not in accelerators:
            return False, f"needs accelerator {accelerator}"
    return True, ""


def device_facts(info: dict[str, Any], device: str, online: bool = True,
                 private: dict[str, Any] | None = None) -> dict[str, Any]:
    """What criteria see of a device: its info, its labels lifted to the top, its id and presence,
    and (on the device only, for tasks that select on the device) labels it never reports."""
    facts = dict(info)
    for key, value in {**(info.get("labels") or {}), **(private or {})}.items():
        facts.setdefault(key, value)
    facts.update(device=device, online=online)
    return facts


def eligible(criteria: Criteria, requirements: dict[str, Any], facts: dict[str, Any]) -> bool:
    """Whether a device with ``facts`` may run a task: the one test, in the cloud and on the device."""
    return criteria.matches(facts) and requirements_met(requirements, facts)[0]
