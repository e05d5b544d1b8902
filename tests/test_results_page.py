"""benchmarks.results --keep: the committed results page splits into what it says of each benchmark."""

from __future__ import annotations

from pathlib import Path

from benchmarks.results import ORDER, kept_parts

PAGE = Path(__file__).parents[1] / "benchmarks" / "RESULTS.md"


def test_the_results_page_splits_into_one_section_per_benchmark():
    parts = kept_parts(PAGE.read_text())
    assert list(parts) == [n for n in ORDER if n in parts] and {"mapping", "naming", "anchor_sweep"} <= set(parts)
    assert parts["naming"]["section"].startswith("## Naming a new type")
    assert parts["anchor_sweep"]["section"].startswith("## Holding the embedding instead of the weights")
    for name, part in parts.items():
        assert part["machine"].startswith(f"- {name}: ") and part["command"].startswith(f"| {name} | `")
    # four scenarios, each with checks 1, 2, 2b and 2c (the two candidates of benchmarks.common.CANDIDATES)
    assert all(row.startswith("| mapping | ") for row in parts["mapping"]["checks"]) and len(parts["mapping"]["checks"]) == 16
    assert parts["speed"]["targets"].startswith("| target | measured |")


def test_a_page_calls_seeds_held_out_only_where_no_default_was_chosen_on_them():
    """Seeds 3-5 scored the rule that chose today's default, so only seeds from 6 on are held out."""
    from argparse import Namespace

    from benchmarks.common import held_out, output_name, seeds_said

    chosen_on, fresh = Namespace(first_seed=3, seeds=3), Namespace(first_seed=6, seeds=3)
    assert not held_out(chosen_on) and "held-out" not in seeds_said(chosen_on) and "3-5" in seeds_said(chosen_on)
    assert held_out(fresh) and seeds_said(fresh).startswith("3 held-out seed(s) (6-8")
    assert not held_out(Namespace(first_seed=5, seeds=2))  # one seed among them is enough
    assert output_name("mapping", fresh) == "mapping_heldout" and output_name("mapping", chosen_on) == "mapping_seeds3"
    assert output_name("sequential", Namespace(first_seed=0, seeds=3)) == "sequential"
