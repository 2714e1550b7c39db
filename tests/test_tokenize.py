"""Token layout, response-only masking, truncation and packing."""

import torch

from rlhfkit.data.records import Demonstration, Ranking, as_messages
from rlhfkit.data.tokenize import Encoded, collate, collate_packed, encode_demonstration, encode_prompt, encode_ranking, fit


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
    exs = [encode_demonstration(tok, Demonstration(as_messages(q), a), 64)
           for q, a in [("Hi", "Hello"), ("What is 2+2?", "4"), ("Name a color", "Blue, like the sky")]]
    packed = collate_packed(exs, tok.pad_token_id, max_length=200)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                       position_ids=packed["position_ids"]).logits
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
    g1 = encode_ranking(tok, Ranking(as_messages("Name a colour of the sea."), ["Blue.", "It is a deep green today", "Grey"], [0, 1, 2]), 64)
    g2 = encode_ranking(tok, Ranking(as_messages("Two plus two?"), ["Four, of course.", "5"], [0, 1]), 64)
    # a prompt cut differently for one response (fit keeps >= max_length // 2 prompt tokens) gets a row of its own
    g3 = encode_ranking(tok, Ranking(as_messages("Tell me about the moon " * 6), ["Short.", "A much longer answer " * 4], [0, 1]), 48)
    assert g3[0].input_ids[: g3[0].prompt_len] != g3[1].input_ids[: g3[1].prompt_len]
    batch, where = collate_shared_prompt([g1, g2, g3], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and len(where) == 7
    row0 = batch["input_ids"][0].tolist()
    assert row0[: g1[0].prompt_len] == g1[0].input_ids[: g1[0].prompt_len]
    assert row0.count(tok.eos_token_id) >= 3  # each of the 3 responses ends in its EOS in the one row
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"]).last_hidden_state
        for (row, col), e in zip(where, [*g1, *g2, *g3]):
            alone = model.model(input_ids=torch.tensor([e.input_ids])).last_hidden_state[0, -1]
            assert batch["input_ids"][row, col] == e.input_ids[-1]
            assert torch.allclose(hidden[row, col], alone, atol=1e-5)
