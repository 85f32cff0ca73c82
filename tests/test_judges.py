"""The gold judge ranks replies as a person would, and judges load from `module:function` specs."""

import pytest

from common.errors import PipelineError
from data.judges import EMPTY_SCORE, gold_judge, load_callable, repetition


def test_gold_judge_prefers_positive_complete_varied_replies():
    replies = ["I love that, it is wonderful!", "ok", "I hate this, it is awful.", ""]
    scores = gold_judge(["q"] * 4, replies, [True] * 4)
    assert scores[0] > scores[1] > scores[2] > scores[3] == EMPTY_SCORE


def test_truncated_and_repetitive_replies_are_marked_down():
    reply = "I love that, it is wonderful!"
    whole, cut = gold_judge(["q", "q"], [reply, reply], [True, False])
    assert whole - cut == pytest.approx(0.5)
    looped = "that is great " * 6
    assert repetition(looped) > 0.6 and repetition(reply) == 0.0
    assert gold_judge(["q"], [looped], [True])[0] < gold_judge(["q"], ["that is great"], [True])[0]


def test_load_callable_finds_the_gold_judge_and_rejects_bad_specs():
    assert load_callable("data.judges:gold_judge") is gold_judge
    with pytest.raises(PipelineError, match="write it as package.module:function"):
        load_callable("data.judges")
    with pytest.raises(PipelineError, match="cannot import module 'no_such_module'"):
        load_callable("no_such_module:judge")
    with pytest.raises(PipelineError, match="has no callable 'nope'"):
        load_callable("data.judges:nope")
