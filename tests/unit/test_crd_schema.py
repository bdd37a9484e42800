"""The ServiceAuthorization CRD (manifests/crds/serviceauthorization.yaml) and its twin in Python,
sidemesh.policy.crd, which must accept and refuse the same documents.

1. The CRD is a valid CustomResourceDefinition v1 for the newest Kubernetes that kubernetes-validate
   ships, and a structural schema (checked here by hand: kubernetes-validate sees only the shape of
   JSONSchemaProps, not the API server's structural rules).
2. One table of ServiceAuthorization documents goes through an emulation of the API server's
   validation and through crd.parse; both must give the verdict the table states. Where crd.py
   disagrees today, the case is an xfail that says why (strict: fixing crd.py turns it into a
   failure until the mark is removed).
3. Every example in manifests/examples/ and in docs/policy.md passes both.

The emulation of the API server (`api_server_errors`):
- openAPIV3Schema is checked with jsonschema's Draft 7 validator. One keyword is translated:
  `nullable: true` becomes the type list [type, "null"]. The schema uses no
  `x-kubernetes-int-or-string`, no Draft 4 boolean `exclusiveMinimum`; jsonschema ignores the
  x-kubernetes-* extensions, `default` and `format` (format: date-time appears in the status only).
- Before validating, the API server drops null values of fields that are not nullable (and have no
  default): `prune_nulls`.
- `pattern` is matched with RE2 (google-re2), whose syntax and semantics Go's regexp shares: the API
  server's engine. Python's re differs: `$` also matches before a final newline, `\\s` is Unicode.
- Strict field validation (kubectl's default, --validate=strict) is mimicked by adding
  `additionalProperties: false` to every object with properties in a copy of the schema. The CRD
  itself has none: by default the API server prunes unknown fields (see `prune`).
- x-kubernetes-validations (CEL) are evaluated with cel-python on each node they sit on, property
  names escaped as Kubernetes escapes them (`namespace` is a CEL keyword: `__namespace__`).
- Not reproduced: the API server's CEL cost estimate (instead, every list, map and string here
  must be bounded), and how its CEL sees a null (here: a present field holding null; the
  controller refuses every null either way, so a null never widens a policy).
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import re2
import yaml

from sidemesh.policy import crd
from sidemesh.policy.model import Mode

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "manifests" / "crds" / "serviceauthorization.yaml"
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))
POLICY_DOC = ROOT / "docs" / "policy.md"

Json = Any


@functools.cache
def crd_document() -> Json:
    return yaml.safe_load(CRD_PATH.read_text())


def version() -> Json:
    (v,) = crd_document()["spec"]["versions"]
    return v


def schema() -> Json:
    return version()["schema"]["openAPIV3Schema"]


def nodes(node: Json, path: str = "") -> Iterator[tuple[str, Json]]:
    """Every schema node with its path (`.spec.rules[].from[]`, `.spec.selector.matchLabels{}`)."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from nodes(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from nodes(node["additionalProperties"], f"{path}{{}}")
    if "items" in node:
        yield from nodes(node["items"], f"{path}[]")


# --- the emulated API server ---------------------------------------------------------------------


def _go_pattern(validator: Any, pattern: str, instance: Any, _schema: Json) -> Iterator[Any]:
    if validator.is_type(instance, "string") and not re2.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"pattern": _go_pattern})


@functools.cache
def strict_validator() -> Any:
    """The schema, with unknown fields refused as strict field validation does."""
    node = copy.deepcopy(schema())
    for _, sub in nodes(node):
        if "properties" in sub:
            sub["additionalProperties"] = False
        if sub.get("nullable"):
            sub["type"] = [sub["type"], "null"]
    return _Validator(node)


# Kubernetes escapes property names for CEL (k8s.io/apiserver/pkg/cel: "Escaping").
_CEL_KEYWORDS = {
    "true", "false", "null", "in", "as", "break", "const", "continue", "else", "for", "function",
    "if", "import", "let", "loop", "package", "namespace", "return", "var", "void", "while",
}  # fmt: skip


def cel_name(name: str) -> str:
    if name in _CEL_KEYWORDS:
        return f"__{name}__"
    for char, word in (("__", "underscores"), (".", "dot"), ("-", "dash"), ("/", "slash")):
        name = name.replace(char, f"__{word}__")
    return name


def cel_value(value: Json, node: Json) -> Json:
    """A document as CEL sees it: object fields under their escaped names, map keys as they are."""
    if isinstance(value, dict) and "properties" in node:
        props = node["properties"]
        return {cel_name(k): cel_value(v, props.get(k, {})) for k, v in value.items()}
    if isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
        return {k: cel_value(v, node["additionalProperties"]) for k, v in value.items()}
    if isinstance(value, list) and "items" in node:
        return [cel_value(v, node["items"]) for v in value]
    return value


@functools.cache
def cel_program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_holds(rule: str, value: Json, node: Json) -> bool:
    try:
        result = cel_program(rule).evaluate({"self": celpy.json_to_cel(cel_value(value, node))})
    except celpy.CELEvalError:
        return False  # the API server reports a rule that fails to evaluate as a validation error
    return isinstance(result, celpy.celtypes.BoolType) and bool(result)


def cel_errors(value: Json, node: Json, path: str) -> Iterator[str]:
    for validation in node.get("x-kubernetes-validations", []):
        if not cel_holds(validation["rule"], value, node):
            yield f"{path}: {validation.get('message', 'failed rule: ' + validation['rule'])}"
    if isinstance(value, dict) and "properties" in node:
        for name, sub in node["properties"].items():
            if name in value:
                yield from cel_errors(value[name], sub, f"{path}.{name}".lstrip("."))
    elif isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
        for key, item in value.items():
            yield from cel_errors(item, node["additionalProperties"], f"{path}[{key}]")
    elif isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            yield from cel_errors(item, node["items"], f"{path}[{i}]")


def field_path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "<root>"


def prune_nulls(value: Json, node: Json) -> Json:
    """The API server drops null values of fields (and map values) that are not nullable and have
    no default, before validating (apiextensions PruneNonNullableNullsWithoutDefaults)."""

    def kept(v: Json, sub: Json) -> bool:
        return v is not None or bool(sub.get("nullable")) or "default" in sub

    if isinstance(value, dict) and "properties" in node:
        props = node["properties"]
        return {
            k: prune_nulls(v, props.get(k, {}))
            for k, v in value.items()
            if k not in props or kept(v, props[k])
        }
    if isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
        sub = node["additionalProperties"]
        return {k: prune_nulls(v, sub) for k, v in value.items() if kept(v, sub)}
    if isinstance(value, list) and "items" in node:
        return [prune_nulls(v, node["items"]) for v in value]
    return value


def api_server_errors(doc: Json) -> list[str]:
    """What the API server would refuse `doc` for, with strict field validation; [] if nothing."""
    doc = prune_nulls(doc, schema())
    errors = [f"{field_path(e.absolute_path)}: {e.message}" for e in strict_validator().iter_errors(doc)]
    return errors + list(cel_errors(doc, schema(), ""))


def prune(value: Json, node: Json) -> Json:
    """What the API server stores when a client does not ask for strict validation."""
    if isinstance(value, dict) and "properties" in node:
        props = node["properties"]
        return {k: prune(v, props[k]) for k, v in value.items() if k in props}
    if isinstance(value, list) and "items" in node:
        return [prune(v, node["items"]) for v in value]
    return value


def parse_error(doc: Json) -> str | None:
    try:
        crd.parse(doc)
    except crd.PolicyError as exc:
        return str(exc)
    return None


# --- the CRD itself ------------------------------------------------------------------------------


def test_crd_is_a_valid_customresourcedefinition_for_the_newest_kubernetes() -> None:
    newest = kubernetes_validate.utils.latest_version()  # "1.37.0"; validate answers "1.37"
    assert kubernetes_validate.validate(crd_document(), newest, strict=True) == newest.rsplit(".", 1)[0]


def test_crd_names_match_the_domain() -> None:
    doc = crd_document()
    spec = doc["spec"]
    group, api_version = crd.API_VERSION.split("/")
    assert doc["metadata"]["name"] == f"{spec['names']['plural']}.{group}"
    assert (spec["group"], spec["scope"], spec["names"]["kind"]) == (group, "Namespaced", crd.KIND)
    assert "sauthz" in spec["names"]["shortNames"]
    assert spec["names"]["categories"] == ["sidemesh"]
    v = version()
    assert (v["name"], v["served"], v["storage"]) == (api_version, True, True)
    assert v["subresources"] == {"status": {}}


def test_schema_is_structural() -> None:
    for path, node in nodes(schema()):
        assert "type" in node, f"{path or '<root>'}: every node needs a type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert "x-kubernetes-preserve-unknown-fields" not in node, f"{path}: unknown fields must be pruned"
        for key in node.get("x-kubernetes-list-map-keys", []):
            assert key in node["items"].get("required", []), f"{path}: list-map key {key} must be required"
        if "default" in node:
            assert not list(_Validator(node).iter_errors(node["default"])), path
    # The API server refuses anything in the metadata schema but a type (even a description).
    assert schema()["properties"]["metadata"] == {"type": "object"}


def test_every_field_has_a_description() -> None:
    """So that `kubectl explain serviceauthorization.spec.rules.from` helps."""
    missing = [
        p or "<root>" for p, node in nodes(schema()) if p != ".metadata" and not node.get("description")
    ]
    assert missing == []


def test_every_list_map_and_string_is_bounded() -> None:
    """The API server estimates CEL cost from these bounds and refuses a CRD if it is unbounded."""
    unbounded = []
    for path, node in nodes(schema()):
        if path in {".apiVersion", ".kind", ".metadata"}:
            continue
        kind = node["type"]
        if kind == "array" and "maxItems" not in node:
            unbounded.append(path)
        if kind == "object" and "additionalProperties" in node and "maxProperties" not in node:
            unbounded.append(path)
        if kind == "string" and "maxLength" not in node:
            unbounded.append(path)
    assert unbounded == []


def test_patterns_compile_as_go_regexps() -> None:
    for path, node in nodes(schema()):
        if "pattern" in node:
            re2.compile(node["pattern"])  # RE2 syntax is Go's regexp syntax
            assert "\\$" not in node["pattern"], path


def test_cel_rules_compile_and_say_what_is_wrong() -> None:
    validations = [v for _, node in nodes(schema()) for v in node.get("x-kubernetes-validations", [])]
    assert validations
    for validation in validations:
        cel_program(validation["rule"])
        assert validation["message"] and "\n" not in validation["rule"]


def test_mode_enum_and_default_match_the_model() -> None:
    mode = schema()["properties"]["spec"]["properties"]["mode"]
    assert mode["enum"] == [m.value for m in Mode]
    assert mode["default"] == Mode.ENFORCE.value == crd.parse(doc_with({})).mode.value


def test_printer_columns_point_at_fields_of_the_schema() -> None:
    for column in version()["additionalPrinterColumns"]:
        node = schema()
        for part in re.sub(r"\[\?\(.*?\)\]", "", column["jsonPath"]).lstrip(".").split("."):
            if node is schema()["properties"]["metadata"]:
                break  # ObjectMeta: creationTimestamp and friends
            node = node.get("items", node)["properties"][part]  # KeyError: no such field
        assert column.get("description"), column["name"]
    names = [c["name"] for c in version()["additionalPrinterColumns"]]
    assert names == ["Mode", "Workloads", "Accepted", "Selector", "Age"]


# --- one table, two validators -------------------------------------------------------------------


def doc_with(spec: Json, **extra: Json) -> Json:
    return {
        "apiVersion": "sidemesh.io/v1alpha1",
        "kind": "ServiceAuthorization",
        "metadata": {"name": "cart-policy", "namespace": "shop"},
        "spec": spec,
        **extra,
    }


def rule(*sources: Json, **to: Json) -> Json:
    """A spec protecting app=cart with one rule."""
    one: Json = {"from": list(sources)}
    if to:
        one["to"] = to
    return {"selector": {"matchLabels": {"app": "cart"}}, "rules": [one]}


FRONTEND = {"serviceAccount": "frontend"}


def source(**fields: Json) -> Json:
    return rule(fields)


def to(**fields: Json) -> Json:
    return rule(FRONTEND, **fields)


def http(**fields: Json) -> Json:
    return to(ports=[8080], http=fields)


def mode(value: Json) -> Json:
    return {**to(), "mode": value}


def exprs(*expressions: Json) -> Json:
    return {**to(), "selector": {"matchLabels": {"app": "cart"}, "matchExpressions": list(expressions)}}


@dataclass(frozen=True)
class Case:
    id: str
    doc: Json
    where: str | None = None  # None: valid; else the field the API server names
    says: str = ""  # part of the API server's message
    parse: str = ""  # crd.parse's message (a regex)
    gap: str | None = None  # crd.parse gives the other verdict today: why


def good(id: str, spec: Json, **extra: Json) -> Case:
    return Case(id, doc_with(spec, **extra))


def bad(id: str, spec: Json, where: str, says: str, parse: str = "", gap: str | None = None) -> Case:
    return Case(id, doc_with(spec), where, says, parse, gap)


def unknown(id: str, spec: Json, where: str, name: str) -> Case:
    """A field the schema does not know: refused under strict field validation."""
    last = re.escape(where.rsplit(".", 1)[-1])
    return bad(id, spec, where, f"('{name}' was unexpected)", rf"{last}: unknown field\(s\) {name} ")


SRC = "spec.rules[0].from[0]"
PORT = "spec.rules[0].to.ports[0]"
METHOD = "spec.rules[0].to.http.methods[0]"
PATH = "spec.rules[0].to.http.paths[0]"
NAMES_NOBODY = "names nobody: give serviceAccount, namespace, or unauthenticated: true"
NOT_COMBINED = ("unauthenticated: true cannot be combined with serviceAccount or namespace",) * 2
NOT_A_NAME = "is not a Kubernetes name"
NOT_A_PATH = "is not a path: it starts with / and may end in \\*"
NO_MATCH = "does not match"
LABEL = "spec.selector.matchLabels.v"
EXPR = "spec.selector.matchExpressions[0]"
NEED_VALUES = "In and NotIn need values; Exists and DoesNotExist take none"
STRINGS = "keys and values must be strings"
ANY_METHOD = "crd.py accepts any upper-case word as a method; the CRD the nine standard ones"
NO_LIMITS = "crd.py enforces none of the CRD's size limits (maxItems, maxLength, maxProperties)"
FINAL_NEWLINE = "crd.py matches with Python's `$`, which also matches before a final newline; Go's does not"
WITHOUT_SPEC = {k: v for k, v in doc_with({}).items() if k != "spec"}
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]
ACCEPTED = {
    "type": "Accepted",
    "status": "True",
    "reason": "Accepted",
    "message": "sent to the sidecars of 3 workloads",
    "lastTransitionTime": "2025-01-01T00:00:00Z",
    "observedGeneration": 2,
}

CASES = [
    good("frontend to cart on 8080", to(ports=[8080])),
    good("an empty spec: every workload, nothing allowed", {}),
    good("no rules: nothing allowed", {"selector": {"matchLabels": {"app": "cart"}}, "rules": []}),
    good("a namespace alone", source(namespace="monitoring")),
    good("a service account of another namespace", source(namespace="ops", serviceAccount="admin")),
    good("prefix wildcards", source(namespace="team*", serviceAccount="web*")),
    good("star alone", rule({"namespace": "*"}, {"serviceAccount": "*"})),
    good("unauthenticated clients", source(unauthenticated=True)),
    good("unauthenticated: false beside a name", source(serviceAccount="frontend", unauthenticated=False)),
    good("several sources", rule(FRONTEND, {"namespace": "monitoring"}, {"unauthenticated": True})),
    good("no to: any port", to()),
    good("empty to: any port", {"rules": [{"from": [FRONTEND], "to": {}}]}),
    good("empty http: any HTTP request", http()),
    good("lowest and highest port", to(ports=[1, 65535])),
    good("every standard method", http(methods=METHODS)),
    good("exact and prefix paths", http(paths=["/", "/*", "/cart/*", "/api*", "/healthz"])),
    good("path characters", http(paths=["/a-b_c.d~e/%20!$&'()+,;=:@/caf%C3%A9"])),
    good("audit mode", mode("audit")),
    good("enforce mode", mode("enforce")),
    good("prefixed label key, empty value", {"selector": {"matchLabels": {"app.kubernetes.io/name": "", "x": ""}}}),
    good("names at the length limits", source(namespace="n" * 63 + "*", serviceAccount="s" * 253 + "*")),
    good("the status the controller writes", to(), status={"conditions": [ACCEPTED], "selectedWorkloads": 3}),
    # A Deployment's kind of selector: matchExpressions (pruned before the CRD knew them: every workload).
    good("every operator", exprs({"key": "app", "operator": "In", "values": ["cart", "basket"]},
                                 {"key": "tier", "operator": "NotIn", "values": ["test"]},
                                 {"key": "mesh", "operator": "Exists"},
                                 {"key": "legacy", "operator": "DoesNotExist", "values": []})),
    bad("In without values", exprs({"key": "app", "operator": "In"}), EXPR, NEED_VALUES, "In needs values"),
    bad("In with no values", exprs({"key": "app", "operator": "In", "values": []}), EXPR, NEED_VALUES, "In needs values"),
    bad("Exists with values", exprs({"key": "app", "operator": "Exists", "values": ["a"]}), EXPR, NEED_VALUES, "Exists takes no values"),
    bad("an unknown operator", exprs({"key": "app", "operator": "Equals", "values": ["a"]}), f"{EXPR}.operator", "'Equals' is not one of", "'Equals' is not one of In"),
    bad("an expression without a key", exprs({"operator": "Exists"}), EXPR, "'key' is a required property", r"\.key: needs a label key"),
    bad("an empty key", exprs({"key": "", "operator": "Exists"}), f"{EXPR}.key", "should be non-empty", r"\.key: needs a label key"),
    unknown("an expression's field misspelt", exprs({"key": "a", "operator": "Exists", "value": ["x"]}), EXPR, "value"),
    bad("17 expressions", exprs(*[{"key": f"k{i}", "operator": "Exists"} for i in range(17)]), "spec.selector.matchExpressions", "is too long", "at most 16"),
    # Who: a rule names somebody, in one way.
    bad("a source that names nobody", source(), SRC, NAMES_NOBODY, r"from\[0\]: names nobody"),
    bad("unauthenticated: false alone", source(unauthenticated=False), SRC, NAMES_NOBODY, "names nobody"),
    bad("unauthenticated and a name", source(unauthenticated=True, serviceAccount="a"), SRC, *NOT_COMBINED),
    bad("unauthenticated and a namespace", source(unauthenticated=True, namespace="a"), SRC, *NOT_COMBINED),
    bad("a rule without from", {"rules": [{}]}, "spec.rules[0]", "'from' is a required property", "needs 'from'"),
    bad("an empty from", rule(), "spec.rules[0].from", "[] should be non-empty", r"from: must not be empty"),
    bad("upper case in a name", source(serviceAccount="Frontend"), f"{SRC}.serviceAccount", NO_MATCH, NOT_A_NAME),
    bad("underscore in a name", source(namespace="my_ns"), f"{SRC}.namespace", NO_MATCH, NOT_A_NAME),
    # ServiceAccount names are DNS subdomains (Kubernetes' ValidateServiceAccountName), namespaces labels.
    good("a ServiceAccount name with dots", source(serviceAccount="build.bot", namespace="ci")),
    bad("a dot in a namespace", source(namespace="team.a"), f"{SRC}.namespace", NO_MATCH, NOT_A_NAME),
    bad("a dot before the star", source(serviceAccount="build.*"), f"{SRC}.serviceAccount", NO_MATCH, NOT_A_NAME),
    bad("star inside a name", source(serviceAccount="fr*nt"), f"{SRC}.serviceAccount", NO_MATCH, NOT_A_NAME),
    # Refused by both today: what comes before the * must end in a letter or digit (docs/policy.md).
    bad("dash before the star", source(serviceAccount="web-*"), f"{SRC}.serviceAccount", NO_MATCH, NOT_A_NAME),
    bad('unauthenticated: "yes"', source(unauthenticated="yes"), f"{SRC}.unauthenticated", "'boolean'", "true or false"),
    # Unknown fields: refused under strict field validation (pruned otherwise: see the test below).
    unknown("from misspelt", {"rules": [{"form": [FRONTEND]}]}, "spec.rules[0]", "form"),
    unknown("serviceAccount misspelt", source(serviceaccount="a"), SRC, "serviceaccount"),
    unknown("labels without matchLabels", {"selector": {"app": "cart"}}, "spec.selector", "app"),
    unknown("an Istio habit: action", {**to(), "action": "ALLOW"}, "spec", "action"),
    unknown("ports misspelt", to(port=[8080]), "spec.rules[0].to", "port"),
    # Where: ports.
    bad("port 0", to(ports=[0]), PORT, "less than the minimum of 1", r"ports\[0\]: 0 is not a port number"),
    bad("port 70000", to(ports=[70000]), PORT, "greater than the maximum of 65535", "70000 is not a port number"),
    bad('port "80"', to(ports=["80"]), PORT, "'80' is not of type 'integer'", "'80' is not a port number"),
    bad("port true", to(ports=[True]), PORT, "True is not of type 'integer'", "True is not a port number"),
    bad("ports not a list", to(ports=8080), "spec.rules[0].to.ports", "not of type 'array'", "must be a list"),
    # HTTP.
    bad("lower-case method", http(methods=["get"]), METHOD, "'get' is not one of", "not an HTTP method in upper case"),
    bad("non-standard method", http(methods=["BREW"]), METHOD, "'BREW' is not one of"),
    bad("method as a list", http(methods=[["GET"]]), METHOD, "is not of type 'string'", r"\['GET'\] is not an HTTP"),
    bad("method as a map", http(methods=[{"GET": 1}]), METHOD, "is not of type 'string'", r"\{'GET': 1\} is not an HTTP"),
    bad("path without a leading slash", http(paths=["cart/*"]), PATH, NO_MATCH, r"\[0\]: 'cart/\*' " + NOT_A_PATH),
    bad("star in the middle of a path", http(paths=["/cart/*/items"]), PATH, NO_MATCH, NOT_A_PATH),
    bad("query in a path", http(paths=["/cart?id=1"]), PATH, NO_MATCH, NOT_A_PATH),
    bad("space in a path", http(paths=["/my cart"]), PATH, NO_MATCH, NOT_A_PATH),
    bad("no-break space in a path", http(paths=["/my\u00a0cart"]), PATH, NO_MATCH, NOT_A_PATH),
    # Mode.
    bad('mode "block"', mode("block"), "spec.mode", "'block' is not one of ['enforce', 'audit']", "not enforce or audit"),
    bad('mode "Enforce"', mode("Enforce"), "spec.mode", "is not one of", "is not enforce or audit"),
    # Shape.
    Case("spec left out", WITHOUT_SPEC, "<root>", "'spec' is a required property", "spec: must be an object"),
    bad("rules not a list", {"rules": {"from": [FRONTEND]}}, "spec.rules", "not of type 'array'", "must be a list"),
    bad("a label value that is a number", {"selector": {"matchLabels": {"v": 2}}}, LABEL, "2 is not of type 'string'", STRINGS),
    # Where crd.py is less strict than the CRD today.
    bad("65 rules", {"rules": to()["rules"] * 65}, "spec.rules", "is too long"),
    bad("a 255-character name", source(serviceAccount="s" * 255), f"{SRC}.serviceAccount", "is too long"),
    bad("a name ending in a newline", source(serviceAccount="cart\n"), f"{SRC}.serviceAccount", NO_MATCH),
    bad("a path ending in a newline", http(paths=["/cart\n"]), PATH, NO_MATCH),
]  # fmt: skip


def _params() -> list[Any]:
    return [pytest.param(c, id=c.id) for c in CASES]


def _parse_params() -> list[Any]:
    return [
        pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.gap, strict=True)] if c.gap else [])
        for c in CASES
    ]


def test_the_table_has_no_duplicate_ids() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", _params())
def test_api_server_verdict(case: Case) -> None:
    errors = api_server_errors(case.doc)
    if case.where is None:
        assert errors == []
    else:
        assert any(e.startswith(f"{case.where}: ") and case.says in e for e in errors), errors


@pytest.mark.parametrize("case", _parse_params())
def test_crd_parse_verdict(case: Case) -> None:
    error = parse_error(case.doc)
    if case.where is None:
        assert error is None
    else:
        assert error is not None, "crd.parse accepted what the API server refuses"
        assert re.search(case.parse, error), error


def _field(dotted: str) -> Json:
    node = schema()
    for part in dotted.split("."):
        node = node.get("items", node)["properties"][part]
    return node.get("items", node)


@pytest.mark.parametrize(
    ("where", "template", "make"),
    [
        ("spec.rules.from.serviceAccount", "a{}b", lambda v: rule({"serviceAccount": v})),
        ("spec.rules.from.namespace", "a{}b", lambda v: rule({"namespace": v})),
        ("spec.rules.to.http.paths", "/a{}b", lambda v: http(paths=[v])),
    ],
)
def test_both_allow_the_same_characters(where: str, template: str, make: Any) -> None:
    """Each character of the Basic Multilingual Plane (and a few beyond) inside a name or a path.
    Go's regexp and Python's re read the same pattern differently (\\s is Unicode in Python), so
    the CRD spells out what crd.py means; this checks that it does."""
    pattern = _field(where)["pattern"]
    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000] + ["\U0001f600", "\U000e0020"]
    disagree = []
    for char in chars:
        value = template.format(char)
        schema_accepts = re2.search(pattern, value) is not None
        parse_accepts = parse_error(doc_with(make(value))) is None
        if schema_accepts != parse_accepts:
            disagree.append(f"{ord(char):#06x}: schema {schema_accepts}, crd.parse {parse_accepts}")
    assert disagree == []


@pytest.mark.parametrize(
    ("path", "write"),
    [
        ("/cart/../admin", "/admin"),
        ("/./cart", "/cart"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/%7Euser/*", "/~user/*"),
        ("/c%61rt", "/cart"),
    ],
)
def test_a_path_the_sidecar_never_sees_is_refused_by_the_controller(path: str, write: str) -> None:
    """The sidecar compares requests' normalized paths: such a rule never matched, and the policy
    said Accepted. The API server takes it (its pattern cannot say this); the controller refuses
    it, naming the path to write."""
    doc = doc_with(http(paths=[path]))
    assert api_server_errors(doc) == []
    error = parse_error(doc)
    assert error is not None and "can never match" in error and repr(write) in error, error
    assert parse_error(doc_with(http(paths=[write]))) is None


def test_a_path_that_is_not_ascii_says_how_to_write_it() -> None:
    """Refused by the API server's pattern and by crd.py (a policy that got past an older CRD)."""
    error = parse_error(doc_with(http(paths=["/café"])))
    assert error is not None and "write it in ASCII" in error and "/caf%C3%A9" in error, error


def test_a_misspelt_source_is_pruned_into_one_that_names_nobody() -> None:
    """Without strict validation the API server drops unknown fields; a misspelt source must then
    be refused rather than stored as a source that allows somebody else."""
    doc = doc_with(rule({"serviceaccount": "frontend"}))
    pruned = prune(doc, schema())
    assert pruned["spec"]["rules"][0]["from"] == [{}]
    assert api_server_errors(pruned) == [f"spec.rules[0].from[0]: {NAMES_NOBODY}"]


def test_match_expressions_are_kept_and_select_as_kubernetes_does() -> None:
    """The schema did not know matchExpressions: without strict validation the API server pruned
    them, and `selector: {}` selected every workload of the namespace (the policy's rules then
    applied to workloads it was never meant for)."""
    spec = exprs(
        {"key": "tier", "operator": "NotIn", "values": ["test"]},
        {"key": "version", "operator": "In", "values": ["v1", "v2"]},
        {"key": "legacy", "operator": "DoesNotExist"},
    )
    doc = doc_with(spec)
    assert prune(doc, schema()) == doc
    policy = crd.parse(doc)
    assert policy.selects("shop", {"app": "cart", "version": "v1"})
    assert policy.selects("shop", {"app": "cart", "version": "v2", "tier": "prod"})
    assert not policy.selects("shop", {"app": "cart", "version": "v1", "tier": "test"})  # NotIn
    assert not policy.selects("shop", {"app": "cart", "version": "v3"})  # In
    assert not policy.selects("shop", {"app": "cart"})  # In: the label must be there
    assert not policy.selects("shop", {"app": "cart", "version": "v1", "legacy": ""})  # DoesNotExist
    assert not policy.selects("shop", {"app": "payments-db", "version": "v1"})  # matchLabels too
    assert not policy.selects("other", {"app": "cart", "version": "v1"})
    # Unreadable expressions: the stand-in selects by the labels alone (more workloads, nothing allowed).
    broken = doc_with(
        {**spec, "selector": {"matchLabels": {"app": "cart"}, "matchExpressions": [{"key": "x"}]}}
    )
    with pytest.raises(crd.PolicyError):
        crd.parse(broken)
    stand_in = crd.stand_in(broken, "invalid")
    assert (
        stand_in is not None and stand_in.rules == () and stand_in.selects("shop", {"app": "cart", "x": "1"})
    )


# --- the examples --------------------------------------------------------------------------------


def example_documents() -> list[Any]:
    return [
        pytest.param(doc, id=f"{path.name}#{i}")
        for path in EXAMPLES
        for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d)
    ]


def documented_policies() -> list[Any]:
    blocks = re.findall(r"^```yaml\n(.*?)^```", POLICY_DOC.read_text(), re.MULTILINE | re.DOTALL)
    docs = [d for d in map(yaml.safe_load, blocks) if d.get("kind") == crd.KIND]
    return [pytest.param(d, id=f"docs/policy.md#{i}:{d['metadata']['name']}") for i, d in enumerate(docs)]


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 5
    assert len(documented_policies()) >= 6


def test_docs_show_each_example_as_it_is() -> None:
    shown = [p.values[0] for p in documented_policies()]
    for example in example_documents():
        assert example.values[0] in shown, f"docs/policy.md does not show {example.id} (or shows it changed)"


@pytest.mark.parametrize("doc", example_documents() + documented_policies())
def test_example_is_accepted_by_both(doc: Json) -> None:
    assert doc["kind"] == crd.KIND
    assert api_server_errors(doc) == []
    assert parse_error(doc) is None


# --- nulls: never a wider policy ----------------------------------------------------------------------

NULL_CASES = {
    # A template with an empty value writes these. Dropped (as the API server drops a null of a
    # field that is not nullable), each would leave a wider policy.
    "serviceAccount next to a namespace": {"from": [{"namespace": "monitoring", "serviceAccount": None}]},
    "namespace next to a serviceAccount": {"from": [{"namespace": None, "serviceAccount": "*"}]},
    "a label value": "selector-tier",
    "matchLabels": "selector-null-labels",
    "selector": "selector-null",
    "matchExpressions": "selector-null-expressions",
    "to": {"from": [{"serviceAccount": "frontend"}], "to": None},
    "ports": {"from": [{"serviceAccount": "frontend"}], "to": {"ports": None}},
    "http": {"from": [{"serviceAccount": "frontend"}], "to": {"http": None}},
    "methods": {"from": [{"serviceAccount": "frontend"}], "to": {"http": {"methods": None}}},
    "paths": {"from": [{"serviceAccount": "frontend"}], "to": {"http": {"paths": None}}},
}


def _null_doc(case: Json) -> Json:
    spec: Json = {
        "selector": {"matchLabels": {"app": "cart"}},
        "rules": [{"from": [{"serviceAccount": "x"}]}],
    }
    if case == "selector-tier":
        spec["selector"]["matchLabels"]["tier"] = None
    elif case == "selector-null-labels":
        spec["selector"]["matchLabels"] = None
    elif case == "selector-null":
        spec["selector"] = None
    elif case == "selector-null-expressions":
        spec["selector"]["matchExpressions"] = None
    else:
        spec["rules"] = [case]
    return {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": spec,
    }


@pytest.mark.parametrize("case", NULL_CASES.values(), ids=NULL_CASES.keys())
def test_a_null_is_kept_and_the_policy_fails_closed(case: Json) -> None:
    """Where dropping a field widens a policy, the schema keeps a null (nullable) so that the
    controller sees it, refuses the policy, and enforces its stand-in, which allows nothing."""
    doc = _null_doc(case)
    assert prune_nulls(doc, schema()) == doc, "the API server would drop the null: a wider policy"
    error = parse_error(doc)
    assert error is not None and "is null (an empty value in a template?)" in error, error
    stand_in = crd.stand_in(doc, error)
    assert stand_in is not None and stand_in.rules == () and stand_in.namespace == "shop"


def test_a_field_name_that_is_not_a_string_is_named_in_the_error() -> None:
    """YAML's `8080: x` in a file of a directory (JSON keys are always strings): the error was a
    TypeError's text naming no field."""
    doc = doc_with(rule({"serviceAccount": "frontend"}, ports=[8080]))
    doc["spec"]["rules"][0]["to"][8080] = "x"
    error = parse_error(doc)
    assert error is not None and "field name 8080 is not a string" in error and "spec.rules[0].to" in error, (
        error
    )
