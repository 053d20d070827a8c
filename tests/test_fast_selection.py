"""`make test-fast` keeps the critical paths: each test named here exists and is not marked
``slow`` or ``browser`` (on itself, on every case of its parametrization, or on its module).

A static check (ast): collecting the suite with ``-m`` would cost as much as the fast run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# path -> tests that `make test-fast` must run (docs/testing.md, "Fast and steady")
CRITICAL = {
    # loss maths against plain-loop float64 references, documented defaults
    "test_losses.py": ["test_matches_naive_reference", "test_defaults_are_the_documented_values"],
    # strict loading, safetensors round trip, torchvision's own ResNet, timm and torchvision loads
    "test_models.py": [
        "test_strict_load_names_missing_unexpected_and_misshaped_tensors",
        "test_save_pretrained_round_trip",
        "test_backbone_equals_torchvision",
    ],
    "test_interop.py": ["test_save_pretrained_loads_strictly_into_torchvision_and_timm"],
    # weights folders: load, tampering refused; registry and torch.hub entry points' identity
    "test_hub.py": [
        "test_load_folder_roundtrip",
        "test_tampered_weights",
        "test_hubconf_entries_cover_registry",
    ],
    "test_weights_mutants.py": ["test_missing_and_extra_tensors_reach_the_strict_check"],
    "test_hubconf_entries.py": ["test_entry_point_returns_its_registry_entry"],
    # documented defaults: fine-tuning's backbone LR, the two views' augmentation probabilities
    "test_finetune_cli.py": ["test_the_documented_default_backbone_lr_is_the_one_used"],
    "test_batch_augment.py": [
        "test_view_specs_read_each_view_from_the_config",
        "test_default_views_are_the_reference_pair_on_both_paths",
    ],
    "test_recipes.py": ["test_recipe_holds_the_reference_values"],
    # feature extraction: every layer's shape and values
    "test_features.py": ["test_layers"],
    # index build and search against brute force, sorted results
    "test_index.py": [
        "test_torch_matches_brute_force",
        "test_results_are_sorted_by_decreasing_similarity",
    ],
    # the CLI: parse errors, help, the main job end to end
    "test_cli_help.py": ["test_every_argument_has_help_text", "test_help_shows_defaults"],
    "test_cli.py": ["test_extract", "test_index_and_search"],
    "test_reliability_inputs.py": ["test_bad_numbers_are_usage_errors"],
    # output folders: never overwrite what a command did not write
    "test_outputs_policy.py": ["test_output_policy"],
    "test_outputs_cli.py": ["test_index_into_its_own_photo_folder_is_refused_and_deletes_nothing"],
    # k-NN evaluation against a naive loop
    "test_evaluate.py": [
        "test_knn_predictions_match_a_naive_loop",
        "test_knn_temperature_changes_the_decision",
    ],
}

EXCLUDED = ("slow", "browser")  # what `make test-fast` deselects


def _excluded(text: str) -> bool:
    return any(re.search(rf"\bmark\.{m}\b", text) for m in EXCLUDED)


def deselected_by_test_fast(source: str, name: str) -> str | None:
    """Why ``make test-fast`` would not run test ``name`` of a module's ``source`` (None: it
    runs at least one case)."""
    tree = ast.parse(source)
    for node in tree.body:
        targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if "pytestmark" in targets and _excluded(ast.unparse(node.value)):
            return "the module's pytestmark"
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    if not funcs:
        return "no such test"
    for deco in funcs[0].decorator_list:
        text = ast.unparse(deco)
        if isinstance(deco, ast.Call) and text.startswith("pytest.mark.parametrize"):
            cases = deco.args[1] if len(deco.args) > 1 else None
            if isinstance(cases, ast.List | ast.Tuple) and all(
                _excluded(ast.unparse(c)) for c in cases.elts
            ):
                return "every case of its parametrization"
        elif _excluded(text):
            return f"its decorator {text}"
    return None


@pytest.mark.parametrize("path", sorted(CRITICAL))
def test_critical_tests_stay_in_the_fast_set(path):
    source = (ROOT / "tests" / path).read_text()
    missing = {n: why for n in CRITICAL[path] if (why := deselected_by_test_fast(source, n))}
    assert not missing, f"make test-fast would skip {path}: {missing}"


def test_the_check_sees_each_way_of_marking_slow():
    module = (
        "import pytest\n"
        "@pytest.mark.slow\ndef test_a(): ...\n"
        "@pytest.mark.parametrize('x', [pytest.param(1, marks=pytest.mark.slow)])\n"
        "def test_b(x): ...\n"
        "@pytest.mark.parametrize('x', [0, pytest.param(1, marks=pytest.mark.slow)])\n"
        "def test_c(x): ...\n"
        "@pytest.mark.browser\ndef test_d(): ...\n"
    )
    assert deselected_by_test_fast(module, "test_a") == "its decorator pytest.mark.slow"
    assert deselected_by_test_fast(module, "test_b") == "every case of its parametrization"
    assert deselected_by_test_fast(module, "test_c") is None
    assert deselected_by_test_fast(module, "test_d") == "its decorator pytest.mark.browser"
    assert deselected_by_test_fast(module, "test_e") == "no such test"
    marked = "import pytest\npytestmark = [pytest.mark.slow]\ndef test_c(): ...\n"
    assert deselected_by_test_fast(marked, "test_c") == "the module's pytestmark"


def test_make_test_fast_deselects_only_slow_and_browser():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ntest-fast:", 1)[1].split("\n\n", 1)[0]
    assert '-m "not slow and not browser"' in recipe, recipe
