"""Token layout, response-only masking, truncation and packing."""

import torch

from rlhfkit.data.records import Demonstration, Ranking, as_messages
from rlhfkit.data.tokenize import (
    Encoded,
    collate,
    collate_packed,
    encode_demonstration,
    encode_prompt,
    encode_ranking,
    encode_response,
    fit,
)


def test_fit_rule_by_hand():
    p, r = list(range(10)), [100, 101, 102, 2]
    assert fit(p, r, 20) == (p, r, False)
    # 14 > 12: prompt keeps max(min(10, 6), 12 - 4) = 8 tokens from the right
    assert fit(p, r, 12) == (list(range(2, 10)), r, True)
    # long response: prompt keeps 12 // 2 = 6, response cut to 6, EOS kept for the RM
    long_r = list(range(100, 120)) + [2]
    p2, r2, cut = fit(p, long_r, 12, eos_last=2)
    assert cut and p2 == list(range(4, 10)) and r2 == [100, 101, 102, 103, 104, 2]
    p3, r3, _ = fit(p, long_r, 12)
    assert r3 == [100, 101, 102, 103, 104, 105]


def test_demonstration_layout_matches_chat_template(tiny):
    tok = tiny.tokenizer
    demo = Demonstration(as_messages("Name a fruit."), "Apple.")
    e = encode_demonstration(tok, demo, 512)
    full = tok.apply_chat_template(demo.messages + [{"role": "assistant", "content": "Apple."}], tokenize=False)
    text = tok.decode(e.input_ids)
    # SmolLM2's template ends an assistant turn with "<|im_end|>\n"; our response ends at the EOS
    assert full.startswith(text) and text.endswith("Apple.<|im_end|>")
    assert tok.decode(e.input_ids[e.prompt_len :]) == "Apple.<|im_end|>"
    assert e.input_ids[-1] == tok.eos_token_id


def test_response_only_loss_mask(tiny):
    tok = tiny.tokenizer
    a = encode_demonstration(tok, Demonstration(as_messages("Hi"), "Hello there"), 512)
    b = encode_demonstration(tok, Demonstration(as_messages("A longer question here?"), "Yes"), 512)
    batch = collate([a, b], tok.pad_token_id)
    for i, e in enumerate([a, b]):
        row = batch["loss_mask"][i]
        n = len(e.input_ids)
        assert row[: e.prompt_len].sum() == 0
        assert row[e.prompt_len : n].sum() == n - e.prompt_len
        assert row[n:].sum() == 0
        assert batch["attention_mask"][i].sum() == n
        assert batch["last_index"][i] == n - 1
        assert batch["input_ids"][i, n - 1] == tok.eos_token_id


def test_ranking_shares_prompt_and_ends_in_eos(tiny):
    tok = tiny.tokenizer
    r = Ranking(as_messages("Pick"), ["one", "two two", "three three three"], [0, 1, 1])
    enc = encode_ranking(tok, r, 512)
    prompt = encode_prompt(tok, r.messages)
    assert len(enc) == 3
    for e in enc:
        assert e.input_ids[: e.prompt_len] == prompt and e.input_ids[-1] == tok.eos_token_id


def test_packing_is_equivalent_to_separate_rows(tiny):
    tok = tiny.tokenizer
    model = tiny.model
    exs = [
        encode_demonstration(tok, Demonstration(as_messages(q), a), 64)
        for q, a in [("Hi", "Hello"), ("What is 2+2?", "4"), ("Name a color", "Blue, like the sky")]
    ]
    packed = collate_packed(exs, tok.pad_token_id, max_length=200)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        logits = model(
            input_ids=packed["input_ids"], attention_mask=packed["attention_mask"], position_ids=packed["position_ids"]
        ).logits
        at = 0
        for e in exs:
            n = len(e.input_ids)
            alone = model(input_ids=torch.tensor([e.input_ids])).logits
            assert torch.allclose(logits[0, at : at + n], alone[0], atol=1e-5)
            assert packed["loss_mask"][0, at : at + n].sum() == n - e.prompt_len
            at += n


def test_collate_pads_right_with_pad_id():
    batch = collate([Encoded([5, 6, 7], 1), Encoded([8], 0)], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]


def test_shared_prompt_rows_score_like_separate_rows(tiny):
    """K responses after one copy of their prompt give the same last-token hidden states as K rows."""
    from rlhfkit.data.tokenize import collate_shared_prompt

    tok, model = tiny.tokenizer, tiny.model
    g1 = encode_ranking(
        tok,
        Ranking(as_messages("Name a colour of the sea."), ["Blue.", "It is a deep green today", "Grey"], [0, 1, 2]),
        64,
    )
    g2 = encode_ranking(tok, Ranking(as_messages("Two plus two?"), ["Four, of course.", "5"], [0, 1]), 64)
    # a prompt cut differently for one response (fit keeps >= max_length // 2 prompt tokens) gets a row of its own
    g3 = encode_ranking(
        tok, Ranking(as_messages("Tell me about the moon " * 6), ["Short.", "A much longer answer " * 4], [0, 1]), 48
    )
    assert g3[0].input_ids[: g3[0].prompt_len] != g3[1].input_ids[: g3[1].prompt_len]
    batch, where = collate_shared_prompt([g1, g2, g3], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and len(where) == 7
    row0 = batch["input_ids"][0].tolist()
    assert row0[: g1[0].prompt_len] == g1[0].input_ids[: g1[0].prompt_len]
    assert row0.count(tok.eos_token_id) >= 3  # each of the 3 responses ends in its EOS in the one row
    with torch.no_grad():
        hidden = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).last_hidden_state
        for (row, col), e in zip(where, [*g1, *g2, *g3]):
            alone = model.model(input_ids=torch.tensor([e.input_ids])).last_hidden_state[0, -1]
            assert batch["input_ids"][row, col] == e.input_ids[-1]
            assert torch.allclose(hidden[row, col], alone, atol=1e-5)


# ---------------------------------------------------------------- found by mutation testing
# Each test below kills mutants of `make mutate` that the tests above let survive (docs/testing.md).
# A tokenizer by hand makes every id computable: one id per character (its code point).


class CharTokenizer:
    """No chat template (not even the attribute), EOS = 0, and like Hugging Face tokenizers it adds a
    BOS (id 1) unless ``add_special_tokens=False`` (and, like the fast ones, takes only a bool there)."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        if not isinstance(add_special_tokens, bool):
            raise TypeError(f"{add_special_tokens!r} is not an instance of 'bool'")
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def ids(text):
    return [ord(c) for c in text]


def test_plain_format_without_chat_template():
    tok = CharTokenizer()
    # every turn becomes "{content}\n\n"; no BOS, and no role names
    assert encode_prompt(tok, as_messages("Hi")) == ids("Hi\n\n")
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "Ok?"},
    ]
    assert encode_prompt(tok, turns) == ids("Hi\n\nYo\n\nOk?\n\n")
    # the response: its ids, no BOS, then one EOS
    assert encode_response(tok, "ok") == [111, 107, 0]


def test_chat_template_returning_a_plain_list():
    class ListTemplate(CharTokenizer):
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and tokenize
            return [9] + ids(messages[-1]["content"]) + [9]  # older transformers return a list, not a dict

    assert encode_prompt(ListTemplate(), as_messages("Hi")) == [9, 72, 105, 9]


def test_encoders_report_truncation_and_end_in_eos():
    tok = CharTokenizer()
    # prompt "Hi\n\n" = 4 ids, response "ok" + EOS = 3: 7 > 5 → the prompt keeps max(min(4, 5 // 2), 5 − 3) = 2
    e = encode_demonstration(tok, Demonstration(as_messages("Hi"), "ok"), max_length=5)
    assert (e.input_ids, e.prompt_len, e.truncated) == ([10, 10, 111, 107, 0], 2, True)
    assert encode_demonstration(tok, Demonstration(as_messages("Hi"), "ok"), max_length=7).truncated is False
    # a long response is cut to the room left (3) and, for the reward model, ends in EOS
    short, long_ = encode_ranking(tok, Ranking(as_messages("Hi"), ["ok", "long answer"], [0, 1]), max_length=5)
    assert (short.input_ids, short.prompt_len, short.truncated) == ([10, 10, 111, 107, 0], 2, True)
    assert (long_.input_ids, long_.prompt_len, long_.truncated) == ([10, 10, 108, 111, 0], 2, True)
    untouched = encode_ranking(tok, Ranking(as_messages("Hi"), ["ok", "no"], [0, 1]), max_length=7)
    assert [e.truncated for e in untouched] == [False, False]


def test_fit_boundaries():
    p, r = list(range(10)), [100, 101, 102, 103]
    # exactly max_length tokens: nothing is cut
    assert fit(p, r, 14) == (p, r, False)
    # the prompt is cut to 8 and the response then fits: it is kept as it is (no EOS written over it)
    assert fit(p, r, 12, eos_last=2) == (list(range(2, 10)), r, True)


def test_collate_dtypes_and_full_loss_mask():
    batch = collate([Encoded([5, 6, 7], 1), Encoded([8], 0)], pad_id=2, response_only=False)
    assert batch["loss_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]  # every real token, the first one too
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["last_index"].tolist() == [2, 0]
    for name in ("input_ids", "attention_mask", "loss_mask", "last_index"):
        assert batch[name].dtype == torch.long, name


def test_collate_packed_by_hand():
    a, b, c = Encoded([5, 6, 7], 1), Encoded([8, 9], 1), Encoded([10, 11, 12], 2)
    # max_length 5: a + b = 5 tokens fill row 0 exactly; c (5 + 3 > 5) starts row 1, padded with 0
    packed = collate_packed([a, b, c], pad_id=0, max_length=5)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 0]]
    assert packed["loss_mask"].tolist() == [[0, 1, 1, 0, 1], [0, 0, 1, 0, 0]]
    assert packed["position_ids"].dtype == packed["loss_mask"].dtype == torch.long
    assert packed["attention_mask"].shape == (2, 1, 5, 5)
    # causal within each example; padding attends to itself only
    assert packed["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert packed["attention_mask"][1, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1],
    ]


def test_collate_shared_prompt_by_hand():
    from rlhfkit.data.tokenize import collate_shared_prompt

    # group 1: prompt [1, 2] with responses [3, 4] and [5]; group 2: prompt [7] with response [8]
    g1 = [Encoded([1, 2, 3, 4], 2), Encoded([1, 2, 5], 2)]
    g2 = [Encoded([7, 8], 1)]
    batch, where = collate_shared_prompt([g1, g2], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0]]
    # each response continues the prompt's positions
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 0, 0]]
    assert batch["position_ids"].dtype == batch["input_ids"].dtype == torch.long
    assert where == [(0, 3), (0, 4), (1, 1)]
    assert batch["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],  # prompt
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # response [3, 4]: the prompt and itself
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # response [5]: the prompt and itself, not [3, 4]
    ]
    assert batch["attention_mask"][1, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],  # padding attends to itself only
        [0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1],
    ]


def test_length_groups_by_hand():
    from rlhfkit.data.tokenize import length_groups

    # sorted: 3 (i1), 4 (i3), 10 (i0), 11 (i2), 30 (i4); slack 1.25
    #   [3] + 4: padded 2·4 = 8 <= 1.25·7 = 8.75 → join; + 10: 3·10 = 30 > 1.25·17 → new group
    #   [10] + 11: 2·11 = 22 <= 1.25·21 = 26.25 → join; + 30: 3·30 = 90 > 1.25·51 → new group
    assert length_groups([10, 3, 11, 4, 30]) == [[1, 3], [0, 2], [4]]
    # the bound is inclusive: 3 + 5 padded to 2·5 = 10 = 1.25·8
    assert length_groups([3, 5]) == [[0, 1]]
    assert length_groups([3, 5], slack=1.2) == [[0], [1]]
    # slack 1 allows no padding at all: only equal lengths share a group
    assert length_groups([4, 4, 5], slack=1.0) == [[0, 1], [2]]
    # equal lengths never pad: one group however many (the real tokens add up: 3·10 <= 1.25·30)
    assert length_groups([10, 10, 10]) == [[0, 1, 2]]
    assert length_groups([]) == []


def test_responses_end_with_the_templates_end_of_turn_not_eos(tmp_path):
    """Gemma's template ends a turn with <end_of_turn>, which is not its EOS: SFT demonstrations and
    RM responses (also cut ones) end with <end_of_turn>, as the template renders the conversation."""
    from families import tiny_family
    from transformers import AutoTokenizer

    from rlhfkit.models.loading import end_of_turn_id

    tok = AutoTokenizer.from_pretrained(tiny_family("gemma3", tmp_path))
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert eot != tok.eos_token_id and end_of_turn_id(tok) == eot
    demo = Demonstration(as_messages("Name a fruit."), "Apple.")
    e = encode_demonstration(tok, demo, 512)
    assert tok.decode(e.input_ids[e.prompt_len :]) == "Apple.<end_of_turn>"
    full = tok.apply_chat_template(demo.messages + [{"role": "assistant", "content": "Apple."}], tokenize=False)
    assert full.startswith(tok.decode(e.input_ids))
    r = Ranking(as_messages("Hi"), ["ok", "a much longer answer than the room left for it"], [0, 1])
    room = len(encode_prompt(tok, r.messages)) + 4
    short, long_ = encode_ranking(tok, r, room)
    assert short.input_ids[-1] == long_.input_ids[-1] == eot and long_.truncated and len(long_.input_ids) == room
    tok.chat_template = None  # no template: EOS
    assert encode_demonstration(tok, demo, 512).input_ids[-1] == tok.eos_token_id
