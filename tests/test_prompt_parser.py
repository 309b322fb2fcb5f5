"""A1111 prompt syntax: emphasis, unbalanced brackets, prompt editing / alternation, extra-network tags."""
from __future__ import annotations

import time

import pytest

from backend.core.prompt_parser import (
    extract_extra_network_tags,
    get_learned_conditioning_prompt_schedules,
    parse_prompt_attention,
)


# --- emphasis ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # A1111's doctests
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
])
def test_attention_a1111_examples(text, expected):
    assert parse_prompt_attention(text) == expected


def test_attention_empty():
    assert parse_prompt_attention("") == [["", 1.0]]


def test_attention_nesting_multiplies():
    assert parse_prompt_attention("((a))") == [["a", 1.1 * 1.1]]
    assert parse_prompt_attention("[[a]]") == [["a", (1 / 1.1) * (1 / 1.1)]]
    assert parse_prompt_attention("((a:2))") == [["a", 2 * 1.1]]
    assert parse_prompt_attention("[(a:2)]") == [["a", 2 / 1.1]]
    # (a)[a] cancel out to 1.1 / 1.1, which is not exactly 1 but close to it
    [[text, weight]] = parse_prompt_attention("([a])")
    assert text == "a" and weight == pytest.approx(1.0)


def test_attention_explicit_weights():
    assert parse_prompt_attention("(a:1.5)") == [["a", 1.5]]
    assert parse_prompt_attention("(a: 1.5 )") == [["a", 1.5]]
    assert parse_prompt_attention("(a:0)") == [["a", 0.0]]
    assert parse_prompt_attention("(a:-1)") == [["a", -1.0]]
    assert parse_prompt_attention("(a:.5) b") == [["a", 0.5], [" b", 1.0]]


def test_attention_colon_is_text_outside_weights():
    assert parse_prompt_attention("a:b") == [["a:b", 1.0]]
    assert parse_prompt_attention("style: anime") == [["style: anime", 1.0]]
    assert parse_prompt_attention("[a:b]") == [["a:b", 1 / 1.1]]
    assert parse_prompt_attention("a:1.2)") == [["a:1.2)", 1.0]]  # nothing to close


def test_attention_bad_weight_is_text():
    # A1111 crashes on this; we keep the ":" as text and close the bracket with 1.1.
    assert parse_prompt_attention("(a:1.2.3)") == [["a:1.2.3", 1.1]]


def test_attention_escapes():
    assert parse_prompt_attention("\\(a\\)") == [["(a)", 1.0]]
    assert parse_prompt_attention("\\[a\\]") == [["[a]", 1.0]]
    assert parse_prompt_attention("a\\\\(b)") == [["a\\", 1.0], ["b", 1.1]]
    assert parse_prompt_attention("(\\(a\\))") == [["(a)", 1.1]]
    assert parse_prompt_attention("a\\b") == [["a\\b", 1.0]]  # other backslashes are text
    assert parse_prompt_attention("end\\") == [["end\\", 1.0]]


def test_attention_unmatched_closers_are_text():
    assert parse_prompt_attention("a) b]") == [["a) b]", 1.0]]
    assert parse_prompt_attention("[a") == [["a", 1 / 1.1]]


def test_break():
    assert parse_prompt_attention("a BREAK b") == [["a", 1.0], ["BREAK", -1], ["b", 1.0]]
    assert parse_prompt_attention("BREAK") == [["", 1.0], ["BREAK", -1], ["", 1.0]]
    assert parse_prompt_attention("a BREAK") == [["a", 1.0], ["BREAK", -1], ["", 1.0]]
    assert parse_prompt_attention("a\nBREAK\nb") == [["a", 1.0], ["BREAK", -1], ["b", 1.0]]


def test_break_needs_uppercase_separate_word():
    assert parse_prompt_attention("breakfast BREAKFAST break") == [["breakfast BREAKFAST break", 1.0]]
    assert parse_prompt_attention("a,BREAK,b") == [["a,", 1.0], ["BREAK", -1], [",b", 1.0]]


def test_break_with_weights_around():
    assert parse_prompt_attention("(a) BREAK [b]") == [
        ["a", 1.1], ["", 1.0], ["BREAK", -1], ["", 1.0], ["b", 1 / 1.1]]
    # Inside brackets it still breaks and keeps its -1 marker (A1111 would weight the marker).
    assert parse_prompt_attention("(a BREAK b)") == [["a", 1.1], ["BREAK", -1], ["b", 1.1]]
    assert parse_prompt_attention("(a BREAK b:1.5)") == [["a", 1.5], ["BREAK", -1], ["b", 1.5]]
    assert parse_prompt_attention("a BREAK BREAK b") == [["a", 1.0], ["BREAK", -1], ["", 1.0], ["BREAK", -1],
                                                         ["b", 1.0]]


def test_attention_long_prompt_is_fast():
    text = ", ".join(f"(word{i}:1.{i % 9 + 1})" if i % 3 == 0 else f"[thing{i}]" for i in range(3000))
    start = time.perf_counter()
    parsed = parse_prompt_attention(text)
    assert time.perf_counter() - start < 2.0
    assert parsed[0] == ["word0", 1.1]
    assert parsed[1] == [", ", 1.0]
    assert parsed[2] == ["thing1", 1 / 1.1]
    assert "".join(t for t, _ in parsed).count("word") == 1000


# --- unbalanced brackets: accepted, read as A1111 reads them ----------------------------------------
# Expected values worked out with A1111's parse_prompt_attention (modules/prompt_parser.py) and, for prompt
# editing, its lark grammar (`start: (prompt | /[][():]/+)*`: a bracket opening no well-formed group is text).

R, S = 1.1, 1 / 1.1


@pytest.mark.parametrize("text, expected", [
    ("smiling girl :)", [["smiling girl :)", 1.0]]),  # ":)" is no weight: nothing is open
    ("a cat)", [["a cat)", 1.0]]),  # a stray ")" is text
    ("(masterpiece, best quality", [["masterpiece, best quality", R]]),  # unclosed "(": the rest weighs 1.1
    ("(red hair:1.2", [["red hair:1.2", R]]),  # ":1.2" is a weight only with its ")"
    ("[low quality", [["low quality", S]]),  # unclosed "[": the rest weighs 1/1.1
    ("a (b [c", [["a ", 1.0], ["b ", R], ["c", R * S]]),
    ("a] (b)) c", [["a] ", 1.0], ["b", R], [") c", 1.0]]),
    ("((a) b", [["a", R * R], [" b", R]]),
    ("(a:1.2 (b:0.5)", [["a:1.2 ", R], ["b", 0.5 * R]]),  # the ":0.5)" closes the inner "(": the outer is open
    ("[a (b:1.5) c", [["a ", S], ["b", 1.5 * S], [" c", S]]),
    ("(a [b) c]", [["a ", R], ["b", R * S], [" c", S]]),  # ")" closes "(", "]" closes "[": they may cross
    ("x :) y (z", [["x :) y ", 1.0], ["z", R]]),
])
def test_attention_unbalanced_brackets_as_a1111(text, expected):
    parsed = parse_prompt_attention(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize("text, expected", [
    ("smiling girl :)", [[10, "smiling girl :)"]]),
    ("(red hair:1.2", [[10, "(red hair:1.2"]]),
    # a stray or unclosed bracket beside a well-formed edit: the edit still counts
    ("a [b:c:5] (x", [[5, "a b (x"], [10, "a c (x"]]),
    ("(a [b:c:5]", [[5, "(a b"], [10, "(a c"]]),
    ("[a:b:5]]", [[5, "a]"], [10, "b]"]]),
    ("smiling :) [x:y:4], happy", [[4, "smiling :) x, happy"], [10, "smiling :) y, happy"]]),
    # the unbalanced bracket inside the edit: A1111's grammar fails and the prompt is used as plain text
    ("[a:b:5", [[10, "[a:b:5"]]),
    ("[(a:b:5]", [[10, "[(a:b:5]"]]),
    ("a [b:c:5 (d)", [[10, "a [b:c:5 (d)"]]),
])
def test_schedules_unbalanced_brackets_as_a1111(text, expected):
    assert get_learned_conditioning_prompt_schedules([text], 10) == [expected]


# --- prompt editing and alternation ---------------------------------------------------------------

def g(prompt: str, steps: int = 10, hires_steps: int | None = None, **kw):
    return get_learned_conditioning_prompt_schedules([prompt], steps, hires_steps, **kw)[0]


@pytest.mark.parametrize("prompt, expected", [
    # A1111's doctests
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("a [{b|d{:.5] c", [[5, "a  c"], [10, "a {b|d{ c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"], [5, "a"], [6, "(b:1.1)"], [7, "a"],
                     [8, "(b:1.1)"], [9, "a"], [10, "(b:1.1)"]]),
    ("[fe|]male", [[1, "female"], [2, "male"], [3, "female"], [4, "male"], [5, "female"], [6, "male"],
                   [7, "female"], [8, "male"], [9, "female"], [10, "male"]]),
    ("[fe|||]male", [[1, "female"], [2, "male"], [3, "male"], [4, "male"], [5, "female"], [6, "male"],
                     [7, "male"], [8, "male"], [9, "female"], [10, "male"]]),
])
def test_schedules_a1111_examples(prompt, expected):
    assert g(prompt) == expected


def test_schedules_hires_a1111_examples():
    assert g("a [b:.5] c", 10, 10) == [[10, "a b c"]]
    assert g("a [b:1.5] c", 10, 10) == [[5, "a  c"], [10, "a b c"]]


def test_schedules_hires_integer_counts_from_first_pass():
    # 10 base steps + 20 hires steps: step 15 overall is step 5 of the hires pass.
    assert g("[a:b:15]", 10, 20) == [[5, "a"], [20, "b"]]
    assert g("[a:b:5]", 10, 20) == [[20, "b"]]
    assert g("plain", 10, 20) == [[20, "plain"]]


def test_schedules_old_timelines():
    assert g("[a:b:0.5]", 10, use_old_scheduling=True) == [[5, "a"], [10, "b"]]
    assert g("[a:b:2.5]", 10, use_old_scheduling=True) == [[2, "a"], [10, "b"]]
    assert g("[a:b:2.5]", 10) == [[10, "a"]]  # new timelines: 2.5 * 10 steps is past the end
    assert g("[a:b:0.5]", 10, 30, use_old_scheduling=True) == [[5, "a"], [10, "b"]]


def test_schedules_from_to_and_remove():
    assert g("a [dog:cat:0.25] park", 20) == [[5, "a dog park"], [20, "a cat park"]]
    assert g("[ in foreground::0.6]x", 10) == [[6, " in foregroundx"], [10, "x"]]
    assert g("[a:b:0]", 10) == [[10, "b"]]
    assert g("[a:b:-3]", 10) == [[10, "b"]]
    assert g("[a:b:99]", 10) == [[10, "a"]]
    assert g("[a:b:1e400]", 10) == [[10, "a"]]


def test_schedules_a1111_readme_example():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
    assert g(prompt, 100) == [
        [25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
        [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
        [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
        [75, "fantasy landscape with a lake and an oak in background masterful"],
        [100, "fantasy landscape with a lake and a christmas tree in background masterful"],
    ]


def test_schedules_nested_alternation_inside_edit():
    assert g("[[x|y]:z:4]", 6) == [[1, "x"], [2, "y"], [3, "x"], [4, "y"], [5, "z"], [6, "z"]]


def test_schedules_keep_emphasis_and_escapes_for_later_parsing():
    assert g("(a [b:2]:1.2) \\[c\\]", 4) == [[2, "(a :1.2) \\[c\\]"], [4, "(a b:1.2) \\[c\\]"]]
    assert g("[\\[x\\]:3]", 4) == [[3, ""], [4, "\\[x\\]"]]


def test_schedules_malformed_groups_stay_text():
    assert g("[a:b:c]") == [[10, "[a:b:c]"]]
    assert g("[a:b:c:3]") == [[10, "[a:b:c:3]"]]
    assert g("(a:b:c) [d:2]") == [[2, "(a:b:c) "], [10, "(a:b:c) d"]]
    assert g("[a:(b]:2]") == [[10, "[a:(b]:2]"]]


def test_schedules_pipe_outside_alternation_is_text():
    assert g("a | b [c:3]") == [[3, "a | b "], [10, "a | b c"]]
    assert g("[a|b:c:3]") == [[3, "a|b"], [10, "c"]]


def test_schedules_several_prompts_and_copies():
    out = get_learned_conditioning_prompt_schedules(["a", "[b:c:2]", "a"], 4)
    assert out == [[[4, "a"]], [[2, "b"], [4, "c"]], [[4, "a"]]]
    out[0][0][1] = "changed"
    assert out[2] == [[4, "a"]]


def test_schedules_deep_but_reasonable_nesting():
    prompt = "(" * 99 + "[a:b:3]" + ")" * 99
    assert g(prompt, 4) == [[3, "(" * 99 + "a" + ")" * 99], [4, "(" * 99 + "b" + ")" * 99]]


def test_schedules_deeply_nested_unclosed_is_fast():
    prompt = "[" * 2000 + "x" + "(" * 2000
    start = time.perf_counter()
    assert g(prompt) == [[10, prompt]]
    assert time.perf_counter() - start < 2.0


# --- extra networks -------------------------------------------------------------------------------

def test_extract_extra_network_tags():
    text, tags = extract_extra_network_tags("a cat <lora:fluffy:0.8>, <lora:style:1:te=0.5> <hypernet:h:1>")
    assert text == "a cat ,  "
    assert tags == [("lora", ["fluffy", "0.8"]), ("lora", ["style", "1", "te=0.5"]), ("hypernet", ["h", "1"])]


def test_extract_extra_network_tags_leaves_other_angle_brackets():
    assert extract_extra_network_tags("a <b> c <:x> <lora:>") == ("a <b> c <:x> <lora:>", [])
    assert extract_extra_network_tags("") == ("", [])
