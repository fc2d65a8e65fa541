"""The Pareto record takes each row's perplexity from the protocol's windows, never a quick look, and draws each family as a line."""
import math

from pareto import eval_ppl

FULL = {"ppl": {"wikitext2": 9.0}, "max_windows": None, "window_nll": [1.0, 2.0, 3.0, 4.0]}


def test_the_whole_test_split_needs_a_run_without_max_windows():
    assert eval_ppl(FULL, None) == 9.0
    assert eval_ppl({"ppl": {"wikitext2": 5.0}, "max_windows": 3}, None) is None


def test_a_prefix_comes_from_a_longer_runs_windows_or_a_run_of_that_many():
    assert math.isclose(eval_ppl(FULL, 2), math.exp(1.5))
    assert eval_ppl({"ppl": {"wikitext2": 5.0}, "max_windows": 2}, 2) == 5.0
    assert eval_ppl({"ppl": {"wikitext2": 5.0}, "max_windows": 2, "window_nll": [1.0, 2.0]}, 3) is None
    assert eval_ppl({"ppl": {"wikitext2": 5.0}, "max_windows": 3}, 2) is None  # no per-window record: not derivable


def test_a_sign_code_and_a_per_layer_mix_are_families_of_their_own():
    from pareto import method_family

    assert method_family({"method": "db-llm", "planes": 2}) == method_family({"method": "db-llm"}) == "db-llm"
    assert method_family({"method": "db-llm", "planes": 1}) == "db-llm 1-plane"
    assert method_family({"method": "db-llm", "planes": 1, "layers": [{"match": "down", "planes": 2}]}) == "db-llm 1-plane mix"
    assert method_family({"method": "billm", "refine_iters": 15}) == "arb-x"
