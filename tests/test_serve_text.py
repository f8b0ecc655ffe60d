"""omni_fast.serve.text: streamed pieces add up to the final text, which is `omni-fast infer`'s decode + strip cut at
the first stop string; nothing past a stop string or inside a possible stop string's start is ever sent."""
import random

import pytest

from omni_fast.serve.text import TextStream, find_stop


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_ckpt))


def _stream(tok, ids, stops=(), chunk=1):
    ts = TextStream(tok, stops)
    pieces = [ts.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(ts.finish())
    return ts, pieces


def _expected(tok, ids, stops=()):
    text = tok.decode(ids, skip_special_tokens=True)
    cut = find_stop(text, stops)
    return (text if cut is None else text[:cut]).strip()


TEXTS = ["  <think>The face is calm, the voice low.</think>\n<answer>neutral</answer>  ",
         "héllo wörld — ünïcode ✓ 你好 🙂 end", "\n\n  leading and trailing   \n", "plain"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_pieces_add_up_to_infers_text(tok, text, chunk):
    ids = tok(text, add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
    ts, pieces = _stream(tok, ids, chunk=chunk)
    assert "".join(pieces) == ts.sent == _expected(tok, ids) == tok.decode(ids, skip_special_tokens=True).strip()
    assert all(not p or not p[0].isspace() or i > 0 for i, p in enumerate(pieces))  # leading space never sent


def test_random_ids_with_broken_utf8(tok):
    """Random ids, incomplete UTF-8 sequences included: the pieces still add up to the whole decode."""
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        ts, pieces = _stream(tok, ids, chunk=rng.choice([1, 2, 5]))
        assert "".join(pieces) == ts.sent == _expected(tok, ids)


def test_trailing_whitespace_is_held_until_text_follows(tok):
    ts = TextStream(tok)
    assert ts.add(tok("ab  ", add_special_tokens=False).input_ids) == "ab"
    assert ts.add(tok("cd", add_special_tokens=False).input_ids) == "  cd"


@pytest.mark.parametrize("stops", [("</answer>",), ("zzz", "</think>"), ("calm",)])
def test_stop_string_cuts_and_nothing_past_it_is_sent(tok, stops):
    text = "<think>The face is calm.</think><answer>happy</answer> more text after"
    ids = tok(text, add_special_tokens=False).input_ids
    ts, pieces = _stream(tok, ids, stops)
    cut = min(text.find(s) for s in stops if s in text)
    assert "".join(pieces) == ts.sent == text[:cut].strip()
    assert ts.stopped
    # the ids kept (the completion's tokens) end with the one that completed the stop string
    k = len(ts.ids)
    assert ts.ids == ids[:k] and k < len(ids)
    assert find_stop(tok.decode(ids[:k]), stops) is not None and find_stop(tok.decode(ids[:k - 1]), stops) is None


def test_stop_string_split_across_tokens_is_never_partly_sent(tok):
    """One character per token: the stop string arrives piece by piece and none of it may go out first."""
    text = "answer: sad</a>tail"
    ids = [i for ch in text for i in tok(ch, add_special_tokens=False).input_ids]
    ts = TextStream(tok, ("</a>",))
    sent = ""
    for i in ids:
        sent += ts.add([i])
        assert "<" not in sent  # "<", "</", "</a" could each be the stop string's start: held back
    sent += ts.finish()
    assert sent == "answer: sad" and ts.stopped


def test_find_stop_takes_the_earliest():
    assert find_stop("a STOP b END", ("END", "STOP")) == 2
    assert find_stop("abc", ("x",)) is None
    assert find_stop("xx x", ("x",), start=2) == 3
