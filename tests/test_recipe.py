"""`Recipe`: precedence table, selectors, JSON/YAML round trips, safe save, errors naming the
rule and field."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import yaml

from edgequant.recipe import RANK, ROLES, Recipe, Rule
from edgequant.schemes import Scheme

FQN, ROLE, LAYER = "layers.3.attention.wq", "attention", 3
# One selector of each kind, all matching (FQN, ROLE, LAYER); strongest first.
SELECTORS = {
    "fqn": dict(module=FQN),
    "regex": dict(module=r"re:layers\.\d+\.attention\..*"),
    "role+layers": dict(role="attention", layers=(1, 3)),
    "role": dict(role="attention"),
    "default": dict(role="default"),
}
KINDS = list(SELECTORS)
A, B = Scheme("int8"), Scheme("int4", "per_group", 32, scale_dtype="fp16")

# (first rule kind, second rule kind, index of the rule that decides)
PRECEDENCE = [
    (first, second, 0 if KINDS.index(first) < KINDS.index(second) else 1)
    for first, second in itertools.permutations(KINDS, 2)
] + [(kind, kind, 1) for kind in KINDS]  # equal rank: the later rule wins


def test_rank_order_is_documented_order():
    assert sorted(RANK, key=RANK.get, reverse=True) == KINDS
    for kind, selector in SELECTORS.items():
        assert Rule(A, **selector).kind == kind


@pytest.mark.parametrize(
    ("first", "second", "winner"), PRECEDENCE, ids=[f"{a}-then-{b}" for a, b, _ in PRECEDENCE]
)
def test_precedence(first, second, winner):
    recipe = Recipe((Rule(A, **SELECTORS[first]), Rule(B, **SELECTORS[second])))
    assert recipe.resolve(FQN, ROLE, LAYER) == ((A, B)[winner], winner)


def test_precedence_all_kinds_in_any_order():
    # with every kind present, removing the deciding rule hands the decision to the next kind
    for order in itertools.permutations(KINDS):
        rules = [Rule(Scheme(f"int{2 + i}"), **SELECTORS[k]) for i, k in enumerate(order)]
        for drop in range(len(KINDS)):
            kept = KINDS[drop:]
            recipe = Recipe(tuple(r for r, k in zip(rules, order, strict=True) if k in kept))
            scheme, index = recipe.resolve(FQN, ROLE, LAYER)
            assert recipe.rules[index].kind == kept[0]
            assert scheme == Scheme(f"int{2 + order.index(kept[0])}")


def test_none_scheme_means_float_and_no_match_is_none_none():
    recipe = Recipe((Rule(A, role="attention"), Rule(None, module=FQN)))
    assert recipe.resolve(FQN, ROLE, LAYER) == (None, 1)
    assert recipe.resolve("layers.3.attention.wk", ROLE, LAYER) == (A, 0)
    assert recipe.resolve("output", "lm_head", None) == (None, None)
    assert Recipe(()).resolve(FQN, ROLE, LAYER) == (None, None)


@pytest.mark.parametrize(
    ("module", "fqn", "selected"),
    [
        (r"re:layers\.3", "layers.3.attention.wq", False),  # prefix only: not selected
        (r"re:layers\.3\..*", "layers.3.attention.wq", True),
        (r"re:.*\.wq", "layers.3.attention.wq", True),
        (r"re:attention", "layers.3.attention.wq", False),  # a search would match; fullmatch not
        (r"re:layers\.[0-2]\..*", "layers.3.attention.wq", False),
        (r"re:layers\.[0-3]\..*", "layers.13.attention.wq", False),
        (r"re:output|lm_head", "output", True),
        ("layers.3.attention", "layers.3.attention.wq", False),  # FQN is exact, not a prefix
        ("layers.3.attention.wq", "layers.3.attention.wq", True),
    ],
)
def test_module_selector_fullmatch(module, fqn, selected):
    assert Rule(A, module=module).matches(fqn, ROLE, LAYER) is selected
    recipe = Recipe((Rule(B, role="default"), Rule(A, module=module)))
    assert recipe.resolve(fqn, ROLE, LAYER) == ((A, 1) if selected else (B, 0))


@pytest.mark.parametrize(
    ("rule", "role", "layer", "selected"),
    [
        (Rule(A, role="attention", layers=(0, 2)), "attention", 0, True),
        (Rule(A, role="attention", layers=(0, 2)), "attention", 2, True),
        (Rule(A, role="attention", layers=(0, 2)), "attention", 1, False),
        (Rule(A, role="attention", layers=(0, 2)), "attention", None, False),
        (Rule(A, role="attention", layers=(0, 2)), "feedforward", 0, False),
        (Rule(A, role="attention"), "attention", 7, True),
        (Rule(A, role="attention"), "attention", None, True),
        (Rule(A, role="attention"), None, 0, False),
        (Rule(A, role="default"), None, None, True),
        (Rule(A, role="default"), "lm_head", None, True),
        (Rule(A, role="default", layers=(1,)), "feedforward", 1, True),
        (Rule(A, role="default", layers=(1,)), "attention", 1, True),
        (Rule(A, role="default", layers=(1,)), "attention", 0, False),
        (Rule(A, role="default", layers=(1,)), "embedding", None, False),
    ],
)
def test_role_and_layers_selectors(rule, role, layer, selected):
    assert rule.matches("some.module", role, layer) is selected


def test_default_with_layers_is_a_role_with_layers_rule():
    rule = Rule(A, role="default", layers=[1, 2])
    assert rule.layers == (1, 2)
    assert rule.kind == "role+layers"
    assert rule.selector() == "role=default layers=[1, 2]"


def example_recipe() -> Recipe:
    return Recipe(
        (
            Rule(
                Scheme("int4", "per_group", 32, scale_dtype="fp16", activation="int8_dynamic"),
                role="default",
            ),
            Rule(Scheme("int8", symmetric=False), role="embedding"),
            Rule(None, role="attention", layers=(0, 29)),
            Rule(Scheme("fp16"), module=r"re:layers\.[0-3]\.feed_forward\..*"),
            Rule(None, module="output"),
        ),
        name="example",
    )


def test_to_dict_file_form():
    assert Recipe((Rule(Scheme("fp16"), role="lm_head", layers=(2,)),)).to_dict() == {
        "format": "edgequant.recipe",
        "version": 1,
        "rules": [{"role": "lm_head", "layers": [2], "scheme": Scheme("fp16").to_dict()}],
    }
    d = example_recipe().to_dict()
    assert d["name"] == "example"
    assert d["rules"][2] == {"role": "attention", "layers": [0, 29], "scheme": None}
    assert d["rules"][4] == {"module": "output", "scheme": None}


@pytest.mark.parametrize(
    "recipe",
    [example_recipe(), Recipe(()), Recipe((Rule(None, role="norm"),), rotate="hadamard")],
)
def test_text_round_trips(recipe):
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert json.loads(recipe.to_json()) == recipe.to_dict()
    assert yaml.safe_load(recipe.to_yaml()) == recipe.to_dict()


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_save_load_round_trip_leaves_only_the_file(tmp_path, suffix):
    recipe = example_recipe()
    path = tmp_path / f"recipe{suffix}"
    assert recipe.save(path) == path
    assert Recipe.load(path) == recipe
    assert Recipe.load(str(path)) == recipe
    text = path.read_text()
    assert text == (recipe.to_json() if suffix == ".json" else recipe.to_yaml())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_save_refuses_to_overwrite(tmp_path, suffix):
    path = tmp_path / f"recipe{suffix}"
    first, second = example_recipe(), Recipe((Rule(Scheme("fp16"), role="default"),))
    first.save(path)
    before = path.read_text()
    with pytest.raises(FileExistsError) as info:
        second.save(path)
    assert str(info.value) == f"{str(path)!r} exists; pass overwrite=True to replace it"
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    second.save(path, overwrite=True)
    assert Recipe.load(path) == second
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_save_refuses_unknown_suffix(tmp_path):
    path = tmp_path / "recipe.txt"
    with pytest.raises(ValueError) as info:
        example_recipe().save(path)
    assert str(info.value) == (f"recipe file {str(path)!r}: expected a .json, .yaml or .yml suffix")
    assert list(tmp_path.iterdir()) == []


INT_SCHEME = "{weight: int8}"
ROLES_LIST = "['default', 'embedding', 'attention', 'feedforward', 'lm_head', 'norm']"
RULE_KEYS = "['role', 'layers', 'module', 'scheme']"
WEIGHTS = (
    "['int2', 'int3', 'int4', 'int5', 'int6', 'int7', 'int8', 'fp16', 'bf16', 'fp32', 'q2_k', "
    "'q3_k', 'q4_k', 'q5_k', 'q6_k']"
)
BAD_YAML = [
    (
        "unknown-top-level-key",
        "version: 1\nrule: []\nrules: []\n",
        "{p}: unknown key(s) ['rule']; allowed: ['format', 'version', 'name', 'rotate', 'rules']",
    ),
    (
        "unknown-rule-key",
        f"rules:\n  - role: default\n    groupsize: 32\n    scheme: {INT_SCHEME}\n",
        f"{{p}}: rules[0]: unknown key(s) ['groupsize']; allowed: {RULE_KEYS}",
    ),
    (
        "unknown-scheme-key",
        "rules:\n  - role: default\n"
        "    scheme: {weight: int4, granularity: per_group, groupsize: 32}\n",
        "{p}: rules[0].scheme: unknown key(s) ['groupsize']; allowed: ['weight', 'granularity', "
        "'group_size', 'symmetric', 'scale_dtype', 'activation', 'activation_symmetric', "
        "'algorithm', 'algorithm_params']",
    ),
    (
        "unknown-weight-dtype",
        f"rules:\n  - role: default\n    scheme: {INT_SCHEME}\n"
        "  - role: attention\n    scheme: {weight: int9}\n",
        f"{{p}}: rules[1].scheme: Scheme: weight 'int9' is not allowed; allowed: {WEIGHTS}",
    ),
    (
        "role-and-module",
        f"rules:\n  - role: attention\n    module: output\n    scheme: {INT_SCHEME}\n",
        "{p}: rules[0]: a rule selects by exactly one of 'role' (with optional 'layers') or "
        "'module' (an FQN or 're:<regex>'); got role='attention', module='output'",
    ),
    (
        "neither-role-nor-module",
        f"rules:\n  - scheme: {INT_SCHEME}\n",
        "{p}: rules[0]: a rule selects by exactly one of 'role' (with optional 'layers') or "
        "'module' (an FQN or 're:<regex>'); got role=None, module=None",
    ),
    (
        "unknown-role",
        f"rules:\n  - role: mlp\n    scheme: {INT_SCHEME}\n",
        f"{{p}}: rules[0]: role 'mlp' is not one of {ROLES_LIST}",
    ),
    (
        "layers-with-module",
        f"rules:\n  - module: output\n    layers: [0]\n    scheme: {INT_SCHEME}\n",
        "{p}: rules[0]: 'layers' narrows a 'role' rule; it cannot go with 'module'",
    ),
    (
        "negative-layer",
        f"rules:\n  - role: attention\n    layers: [0, -1]\n    scheme: {INT_SCHEME}\n",
        "{p}: rules[0]: layers must be a non-empty list of indices >= 0, got [0, -1]",
    ),
    (
        "missing-scheme",
        "rules:\n  - role: attention\n",
        "{p}: rules[0]: missing 'scheme' (a scheme mapping, or null for float)",
    ),
    (
        "version-2",
        f"version: 2\nrules:\n  - role: default\n    scheme: {INT_SCHEME}\n",
        "{p}: version 2 is not supported (this edgequant reads version 1)",
    ),
    (
        "wrong-format",
        "format: gguf\nrules: []\n",
        "{p}: format 'gguf' is not 'edgequant.recipe'",
    ),
    (
        "unknown-rotation",
        "rotate: spinquant\nrules: []\n",
        "{p}: rotate 'spinquant' is not one of ['hadamard', 'random'] (or null)",
    ),
    (
        "rules-not-a-list",
        "rules: {role: default}\n",
        "{p}: 'rules' must be a list of rules, got {{'role': 'default'}}",
    ),
]


@pytest.mark.parametrize(("text", "msg"), [c[1:] for c in BAD_YAML], ids=[c[0] for c in BAD_YAML])
def test_bad_yaml_file_names_rule_and_field(tmp_path, text, msg):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        Recipe.load(path)
    assert str(info.value) == msg.format(p=path)


@pytest.mark.parametrize(("text", "msg"), [c[1:] for c in BAD_YAML], ids=[c[0] for c in BAD_YAML])
def test_bad_json_file_names_rule_and_field(tmp_path, text, msg):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(yaml.safe_load(text)))
    with pytest.raises(ValueError) as info:
        Recipe.load(path)
    assert str(info.value) == msg.format(p=path)


def test_invalid_regex_names_rule_and_pattern(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n  - module: 're:layers.(\\d+'\n    scheme: null\n")
    try:
        re.compile(r"layers.(\d+")
    except re.error as e:
        reason = str(e)
    with pytest.raises(ValueError) as info:
        Recipe.load(path)
    assert (
        str(info.value) == f"{path}: rules[0]: module regex 'layers.(\\\\d+' is invalid: {reason}"
    )
    with pytest.raises(ValueError, match=re.escape("module regex '[' is invalid: ")):
        Rule(None, module="re:[")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError) as info:
        Recipe.load(path)
    assert str(info.value) == f"recipe file {str(path)!r} does not exist"


def test_txt_suffix_refused(tmp_path):
    path = tmp_path / "recipe.txt"
    path.write_text(example_recipe().to_yaml())
    with pytest.raises(ValueError) as info:
        Recipe.load(path)
    assert str(info.value) == f"recipe file {str(path)!r}: expected a .json, .yaml or .yml suffix"


def test_invalid_yaml_and_json_text(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rules: [\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid YAML: ")):
        Recipe.load(path)
    path = tmp_path / "bad.json"
    path.write_text('{"rules": [}')
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid JSON: ")):
        Recipe.load(path)
    with pytest.raises(ValueError, match=re.escape("recipe: not valid JSON: ")):
        Recipe.from_json("rules: []")


def test_non_mapping_documents(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- role: default\n")
    with pytest.raises(TypeError) as info:
        Recipe.load(path)
    assert str(info.value) == f"{path}: expected a mapping with 'rules', got list"
    with pytest.raises(TypeError) as info:
        Recipe.from_yaml("rules: [int8]")
    assert str(info.value) == (f"recipe: rules[0]: expected a mapping with {RULE_KEYS}, got 'int8'")


def test_rule_and_recipe_type_errors():
    with pytest.raises(TypeError) as info:
        Rule("int8", role="default")
    assert str(info.value) == "rule scheme must be a Scheme or None, got 'int8'"
    with pytest.raises(TypeError) as info:
        Recipe((Rule(A, role="default"), "int8"))
    assert str(info.value) == "rules[1] must be a Rule, got str"


def test_describe_and_roles():
    assert ROLES == ("default", "embedding", "attention", "feedforward", "lm_head", "norm")
    assert example_recipe().describe() == "\n".join(
        [
            "[0] role=default -> int4 g32 sym fp16-scales, act int8 dynamic asym",
            "[1] role=embedding -> int8 per-channel asym",
            "[2] role=attention layers=[0, 29] -> float (left as is)",
            r"[3] module=re:layers\.[0-3]\.feed_forward\..* -> fp16",
            "[4] module=output -> float (left as is)",
        ]
    )


def test_map_schemes_keeps_float_rules():
    recipe = example_recipe().map_schemes(lambda s: Scheme("fp16"))
    assert [r.scheme for r in recipe.rules] == [
        Scheme("fp16"),
        Scheme("fp16"),
        None,
        Scheme("fp16"),
        None,
    ]
    assert [r.selector() for r in recipe.rules] == [r.selector() for r in example_recipe().rules]
    assert recipe.name == "example"


@pytest.mark.parametrize(("layers", "shown"), [("3", "3"), ("[true]", "True"), ("[0, 1.5]", "1.5")])
def test_bad_layers_value_names_the_field(layers, shown):
    text = f"rules:\n  - role: attention\n    layers: {layers}\n    scheme: null\n"
    with pytest.raises((TypeError, ValueError)) as info:
        Recipe.from_yaml(text)
    assert str(info.value).startswith("recipe: rules[0]: layers must be "), str(info.value)
    assert shown in str(info.value)


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    # nine levels of nine aliases: 9**9 (387 million) values from under 300 bytes
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("rules: [{scheme: {weight: int8}}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bomb.yaml: expands to more than 100000 values"):
        Recipe.load(path)


def test_deep_nesting_is_refused_by_name(tmp_path):
    deep_json = tmp_path / "deep.json"
    deep_json.write_text("[" * 50000 + "]" * 50000)
    with pytest.raises(ValueError, match=r"deep.json: nested deeper than 32 levels"):
        Recipe.load(deep_json)
    deep_yaml = tmp_path / "deep.yaml"
    deep_yaml.write_text("rules: " + "[" * 40 + "]" * 40 + "\n")
    with pytest.raises(ValueError, match=r"deep.yaml: nested deeper than 32 levels"):
        Recipe.load(deep_yaml)


def test_oversized_folder_and_non_utf8_recipe_files_are_refused_by_name(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ValueError, match=r"recipe file '.*big.yaml' is \d+ bytes; at most 1048576"):
        Recipe.load(big)
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"recipe file '.*folder.yaml' is a folder, not a text"):
        Recipe.load(folder)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: caf\xe9\nrules: []\n")
    with pytest.raises(
        ValueError, match=r"recipe file '.*latin.yaml' is not UTF-8 text: byte 9 is 0xe9"
    ):
        Recipe.load(latin)


def test_deep_json_is_refused_even_with_a_raised_recursion_limit(tmp_path, value_error_in_child):
    # torch.export raises the recursion limit; Python's C JSON decoder then overflowed the C
    # stack on deep nesting (a segfault in the full suite). A child process, so that a crash
    # cannot take the test run with it.
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200000 + "]" * 200000)
    out = value_error_in_child(
        "from edgequant.recipe import Recipe", "Recipe.load", deep,
        setup="sys.setrecursionlimit(10**6)",
    )  # fmt: skip
    assert "deep.json: nested deeper than 32 levels" in out


def test_the_rotated_gptaq_example_is_the_measured_configuration():
    # examples/rotated-gptaq.yaml: what docs/rotation.md measured (Hadamard, 8da4w g32 decoder
    # linears by GPTQ with gptaq 0.25, gptaq_residual 0.25, gptaq_head 1 and sequential,
    # embedding and head float)
    from pathlib import Path

    from edgequant.quantize import as_recipe

    path = Path(__file__).resolve().parents[1] / "examples" / "rotated-gptaq.yaml"
    recipe = as_recipe(str(path))
    assert recipe.rotate == "hadamard"
    linear, _ = recipe.resolve("model.layers.3.mlp.down_proj", "feedforward", 3)
    assert linear == Scheme("int4", "per_group", 32, scale_dtype="fp16",
                            activation="int8_dynamic", algorithm="gptq",
                            algorithm_params={"gptaq": 0.25, "gptaq_residual": 0.25,
                                              "gptaq_head": 1.0, "sequential": True})  # fmt: skip
    for fqn, role in (("model.embed_tokens", "embedding"), ("lm_head", "lm_head")):
        scheme, rule = recipe.resolve(fqn, role, None)
        assert scheme is None and recipe.rules[rule].role == role  # float by its own rule
