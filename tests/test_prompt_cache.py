"""The saved prompts a shared model restores when it comes back to a conversation."""

from llm.prompt_cache import PromptCache, shared_prefix


def test_shared_prefix():
    assert shared_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert shared_prefix([1, 2], [1, 2, 3]) == 2
    assert shared_prefix([], [1]) == 0


def test_the_saved_prompt_sharing_most_is_found():
    cache = PromptCache(budget_bytes=100)
    cache.put([1, 2, 3, 4], b"a")
    cache.put([1, 2, 9], b"b")
    saved, shared = cache.best([1, 2, 3, 4, 5])
    assert saved.tokens == (1, 2, 3, 4) and saved.state == b"a" and shared == 4
    assert cache.best([7, 8]) is None


def test_a_prompt_covered_by_a_saved_one_is_not_saved_again_and_covers_its_prefixes():
    cache = PromptCache(budget_bytes=100)
    cache.put([1, 2], b"xx")
    cache.put([1, 2, 3], b"yyy")  # the longer one covers [1, 2]: it replaces it
    assert len(cache) == 1 and cache.bytes == 3
    assert cache.refresh([1, 2])
    cache.put([1, 2], b"zz")
    assert len(cache) == 1 and cache.best([1, 2])[0].state == b"yyy"


def test_the_least_recently_used_go_first_when_over_budget():
    cache = PromptCache(budget_bytes=10)
    cache.put([1], b"aaaa")
    cache.put([2], b"bbbb")
    assert cache.refresh([1])  # used: [2] is now the oldest
    cache.put([3], b"cccc")
    assert cache.bytes == 8
    assert cache.best([2]) is None and cache.best([1]) is not None
    cache.put([4], b"x" * 11)  # larger than the whole budget: not kept
    assert cache.best([4]) is None and cache.bytes == 8


def test_the_same_conversation_a_turn_earlier_is_replaced():
    cache = PromptCache(budget_bytes=100, distinct_tokens=2)
    cache.put([1, 2, 3, 4, 5, 6, 7, 8], b"turn 1")  # ends in the reply as generated: 7, 8
    cache.put([9, 9, 9], b"other")
    cache.put([1, 2, 3, 4, 5, 6, 0, 10, 11], b"turn 2")  # as spoken: 0; the next turn: 10, 11
    assert len(cache) == 2 and cache.best([1, 2, 3, 4, 5, 6, 7, 8])[0].state == b"turn 2"
    cache.put([1, 2, 3, 4, 5, 0, 0, 0, 0], b"branch")  # three tokens apart: kept beside it
    assert len(cache) == 3


def test_two_conversations_that_share_only_their_start_are_both_kept():
    cache = PromptCache(budget_bytes=100, distinct_tokens=2)
    cache.put([1, 2, 3, 4], b"a")
    cache.put([1, 2, 5, 6], b"b")  # two tokens apart, but half of it
    assert len(cache) == 2
