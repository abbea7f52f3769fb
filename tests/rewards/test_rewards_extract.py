from fastmath_nemo.rewards.extract import last_boxed_answer, think_section


def test_nested_braces():
    assert last_boxed_answer(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed_answer(r"\boxed{\sqrt{\frac{a^{2}}{b}}}") == r"\sqrt{\frac{a^{2}}{b}}"


def test_last_box_wins():
    assert last_boxed_answer(r"try \boxed{1} then \boxed{2}") == "2"


def test_absent_or_unbalanced():
    assert last_boxed_answer("the answer is 42") is None
    assert last_boxed_answer(r"\boxed{\frac{1}{2}") is None
    # the last box is truncated: no fallback to the earlier one
    assert last_boxed_answer(r"\boxed{1} and \boxed{\frac{3}") is None


def test_escaped_braces_and_spacing():
    assert last_boxed_answer(r"\boxed{\{1,2\}}") == r"\{1,2\}"
    assert last_boxed_answer(r"\boxed {7}") == "7"
    assert last_boxed_answer(r"\boxed{}") == ""


def test_think_section():
    assert think_section("abc</think>def</think>") == "abc"
    assert think_section("no close tag") is None
