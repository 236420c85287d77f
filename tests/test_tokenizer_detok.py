"""Detokenizer: continuation text, whole characters and graphemes, stop sequences, hold-back and replay."""

from __future__ import annotations

import json

import pytest
import regex
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from services.common.protocol import DetokParams, StopReason
from services.tokenizer.detokenizer import DetokenizationError, Detokenizer, TextDecoder
from services.tokenizer.encoding import load_tokenizer

pytestmark = pytest.mark.demo_model

EOS = 2  # <|im_end|> in the demo tokenizer, </s> in the Llama-style one
STORY = " Once upon a time, there was a little girl who was very confused by the cat and the dog."
MULTIBYTE = [
    " Hello, world!",
    " café naïve façade — “quoted” ½ ™",
    " 日本語のテキストと中文字符 한국어",
    " 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇩🇪 e\u0301 ok",
]


@pytest.fixture(scope="module")
def demo(demo_model_path) -> TextDecoder:
    return TextDecoder(load_tokenizer(demo_model_path))


@pytest.fixture(scope="module")
def llama() -> TextDecoder:
    """A Llama-2 style tokenizer: byte-fallback BPE, a `Sequence` decoder, BOS added."""
    corpus = [STORY, *MULTIBYTE, "A cat. A dog. Hello world, how are you today?"] * 3
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=220, special_tokens=["<unk>", "<s>", "</s>"]))
    trained = json.loads(tok.to_str())["model"]
    vocab = dict(trained["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) for m in trained["merges"]]
    tok.model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return TextDecoder(tok)


def params(**overrides) -> DetokParams:
    settings = dict(
        stop_sequences=[], include_stop_sequence=True, skip_special_tokens=True, eos_token_id=EOS, stream=True
    )
    settings.update(overrides)
    return DetokParams(**settings)


def encode(decoder: TextDecoder, text: str) -> list[int]:
    return decoder.tokenizer.encode(text, add_special_tokens=False).ids


def run(decoder: TextDecoder, ids: list[int], p: DetokParams, *, chunk: int = 1, stop_reason=StopReason.MAX_TOKENS):
    """Feed `ids` in items of `chunk` ids, the last one ending the request; return (texts, deltas)."""
    detok = Detokenizer(decoder, "req", p)
    texts, deltas = [], []
    for start in range(0, len(ids), chunk):
        last = start + chunk >= len(ids)
        delta = detok.feed(ids[start : start + chunk], start, stop_reason if last else StopReason.NOT_FINISHED)
        assert len(delta.texts) <= min(chunk, len(ids) - start)
        texts += delta.texts
        deltas.append(delta)
        if detok.finished:
            break
    assert detok.finished
    return texts, deltas


def assert_whole_graphemes(texts: list[str]) -> None:
    full = "".join(texts)
    boundaries = {0}
    for match in regex.finditer(r"\X", full):
        boundaries.add(match.end())
    position = 0
    for text in texts:
        assert "\ufffd" not in text
        position += len(text)
        assert position in boundaries, f"release ends inside a grapheme cluster: {texts}"


@pytest.mark.parametrize("text", [STORY, *MULTIBYTE])
@pytest.mark.parametrize("chunk", [1, 3])
def test_concatenation_equals_full_decode(demo, llama, text, chunk):
    ids = encode(demo, text)
    texts, _ = run(demo, ids, params(), chunk=chunk)
    assert "".join(texts) == demo.tokenizer.decode(ids) == text
    assert_whole_graphemes(texts)
    # The Llama tokenizer's own decode drops the first space; as a continuation it is kept.
    texts, _ = run(llama, encode(llama, text.removeprefix(" ")), params(), chunk=chunk)
    assert "".join(texts) == text
    assert_whole_graphemes(texts)


def test_last_grapheme_held_back_until_next_token_or_end(demo):
    ids = encode(demo, " Hello world")
    texts, _ = run(demo, ids, params())
    assert texts == [" Hell", "o world"]
    # 👍 and its skin tone 🏽 are one cluster: never released apart, even though the bytes arrive separately.
    ids = encode(demo, " 👍🏽!")
    texts, _ = run(demo, ids, params())
    assert "".join(texts) == " 👍🏽!" and not any(t.endswith("👍") for t in texts)


def test_unary_releases_everything_at_the_end(demo):
    ids = encode(demo, STORY)
    texts, _ = run(demo, ids, params(stream=False))
    assert texts == [""] * (len(ids) - 1) + [STORY]


def test_continuation_keeps_the_leading_space(demo, llama):
    # Both first tokens carry the space (the Llama normalizer prepends "▁"), which a fresh decode would drop.
    for decoder, text in ((demo, " there was"), (llama, "there was")):
        texts, _ = run(decoder, encode(decoder, text), params())
        assert decoder.piece(encode(decoder, text)[0])[0] in "Ġ▁"
        assert "".join(texts) == " there was"


@pytest.mark.parametrize(("decoder_name", "text"), [("demo", " Hi there"), ("llama", "Hi there")])
def test_special_tokens_skipped_or_kept_and_final_eos_never_shown(decoder_name, text, request):
    decoder = request.getfixturevalue(decoder_name)
    ids = [1, *encode(decoder, text), EOS]
    bos = decoder.piece(1)
    texts, _ = run(decoder, ids, params(), stop_reason=StopReason.EOS_TOKEN)
    assert "".join(texts) == " Hi there"
    texts, _ = run(decoder, ids, params(skip_special_tokens=False), stop_reason=StopReason.EOS_TOKEN)
    assert "".join(texts).replace(" ", "") == f"{bos}Hithere" and decoder.piece(EOS) not in "".join(texts)


def reference_stop(decoder: TextDecoder, ids: list[int], p: DetokParams) -> tuple[str, int | None]:
    """TGIS stop matching re-done from full decodes: (final text, index of the stopping id or None)."""
    previous = b""
    for count in range(1, len(ids) + 1):
        text = decoder.tokenizer.decode(ids[:count])
        # Like TGIS, an id that leaves a character incomplete adds no text: its bytes come with a later id.
        out = previous if text.endswith("\ufffd") else text.encode()
        if count < len(ids) and count >= p.min_new_tokens and len(out) > len(previous):
            for stop in (s.encode() for s in p.stop_sequences):
                position = out.rfind(stop, max(0, len(previous) - len(stop) + 1))
                if position >= 0:
                    cut = position + len(stop) if p.include_stop_sequence else position
                    return out[:cut].decode(), count - 1
        previous = out
    return decoder.tokenizer.decode(ids), None


def check_stop(decoder: TextDecoder, text: str, p: DetokParams) -> tuple[str, int | None]:
    """Run streaming and unary, compare both to the reference; return (text, stopping index)."""
    ids = encode(decoder, text)
    expected, index = reference_stop(decoder, ids, p)
    for stream in (True, False):
        p.stream = stream
        texts, deltas = run(decoder, ids, p)
        assert "".join(texts) == expected
        if index is None:
            assert deltas[-1].stop_reason == StopReason.NOT_FINISHED
        else:
            assert len(texts) == index + 1
            assert deltas[-1].stop_reason == StopReason.STOP_SEQUENCE
            assert deltas[-1].stop_sequence in p.stop_sequences
    return expected, index


@pytest.mark.parametrize("include", [True, False])
def test_stop_sequences(demo, include):
    def stopped(*stops: str, text: str = STORY, **kw) -> str:
        result, index = check_stop(demo, text, params(stop_sequences=list(stops), include_stop_sequence=include, **kw))
        assert index is not None
        return result

    assert stopped(" upon") == (" Once upon" if include else " Once")  # a single token
    assert stopped("on a t") == (" Once upon a t" if include else " Once up")  # spans tokens, ends mid-token
    assert stopped("confu") == (STORY[: STORY.index("confu") + 5 * include])  # ends inside " confused"
    # Both match at " girl": the first in the list wins, not the earliest position.
    assert stopped("girl", "a little girl") == (STORY[: STORY.index("girl") + 4 * include])
    assert stopped("a little girl", "girl") == (STORY[: STORY.index("a little") + 13 * include])
    # Multi-byte stop sequences, also when the emoji's bytes come in several tokens.
    assert stopped("é naï", text=MULTIBYTE[1]) == (" café naï" if include else " caf")
    assert stopped("👍🏽", text=MULTIBYTE[3]) == (" 😀 👍🏽" if include else " 😀 ")
    # min_new_tokens: " the" in " there" (token 6) comes too early, " the cat" stops.
    assert stopped(" the") == STORY[: STORY.index(" there") + 4 * include]
    assert stopped(" the", min_new_tokens=12) == STORY[: STORY.index(" the cat") + 4 * include]


def test_stop_sequence_on_the_schedulers_last_token_is_not_applied(demo):
    ids = encode(demo, " Once upon")
    texts, deltas = run(demo, ids, params(stop_sequences=[" upon"], include_stop_sequence=False))
    assert "".join(texts) == " Once upon" and deltas[-1].stop_reason == StopReason.NOT_FINISHED


def test_item_without_ids_only_flushes(demo):
    detok = Detokenizer(demo, "req", params())
    assert detok.feed([], 0, StopReason.TIME_LIMIT).texts == [] and detok.finished
    detok = Detokenizer(demo, "req", params())
    assert detok.feed(encode(demo, " Hello"), 0, StopReason.NOT_FINISHED).texts == [" Hell"]
    assert detok.feed([], 1, StopReason.TIME_LIMIT).texts == ["o"] and detok.finished


def test_ids_after_a_match_are_ignored(demo):
    ids = encode(demo, STORY)
    detok = Detokenizer(demo, "req", params(stop_sequences=[" time"]))
    delta = detok.feed(ids, 0, StopReason.NOT_FINISHED)
    assert "".join(delta.texts) == " Once upon a time" and len(delta.texts) == 4 and detok.finished


@pytest.mark.parametrize("include", [True, False])
def test_streaming_hold_back_never_releases_text_a_stop_takes_back(demo, include):
    """Every stop sequence of 1-5 bytes cut from the generated bytes: streaming equals unary equals reference."""
    text = STORY[:40] + MULTIBYTE[3][:12]
    data = text.encode()
    stops = {data[i : i + n] for n in range(1, 6) for i in range(0, len(data) - n, 3)}
    for stop in sorted(s.decode() for s in stops if _utf8(s)):
        check_stop(demo, text, params(stop_sequences=[stop], include_stop_sequence=include))


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_hold_back_amounts(demo):
    ids = encode(demo, " Hello world")
    detok = Detokenizer(demo, "req", params(stop_sequences=["zzzz"], include_stop_sequence=False))
    # The longest stop sequence's 4 bytes stay back: 6 bytes decoded, 2 released.
    assert detok.feed(ids[:1], 0, StopReason.NOT_FINISHED).texts == [" H"]
    detok = Detokenizer(demo, "req", params(stop_sequences=["zzzz"], include_stop_sequence=True))
    assert detok.feed(ids[:1], 0, StopReason.NOT_FINISHED).texts == [" Hell"]


@pytest.mark.parametrize("stops", [[], [" the", "zz"]])
@pytest.mark.parametrize("include", [True, False])
def test_replay_continues_like_the_lost_detokenizer(demo, stops, include):
    ids = encode(demo, MULTIBYTE[3] + STORY)
    p = params(stop_sequences=stops, include_stop_sequence=include, min_new_tokens=30)
    whole, _ = run(demo, ids, p)
    for split in (5, 17, 31):
        lost = Detokenizer(demo, "req", p)
        before = lost.feed(ids[:split], 0, StopReason.NOT_FINISHED).texts
        resumed = Detokenizer(demo, "req", p)
        resumed.feed(ids[:split], 0, StopReason.NOT_FINISHED)
        after = resumed.feed(ids[split:], split, StopReason.MAX_TOKENS).texts
        assert before + after == whole


def word_level(decoder, vocab: list[str], pre_tokenizer=None) -> TextDecoder:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[0]))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoder
    return TextDecoder(tok)


@pytest.mark.parametrize(
    ("decoder", "vocab", "pieces", "expected"),
    [
        (None, ["<unk>", "A", "hello", "world"], ["hello", "world"], " hello world"),
        (
            decoders.WordPiece(),
            ["[UNK]", "A", "hello", "##ing", "world"],
            ["hello", "##ing", "world"],
            " helloing world",
        ),
        (decoders.Metaspace(), ["<unk>", "▁A", "▁hello", "▁world"], ["▁hello", "▁world"], " hello world"),
        (
            decoders.BPEDecoder(),
            ["<unk>", "A", "hel", "lo</w>", "wor", "ld</w>"],
            ["hel", "lo</w>", "wor", "ld</w>"],
            "hello world",
        ),
        (
            decoders.CTC(),
            ["<pad>", "A", "h", "e", "l", "o"],
            ["h", "h", "e", "l", "l", "<pad>", "l", "o", "o"],
            "hello",
        ),
    ],
)
def test_decoder_types(decoder, vocab, pieces, expected):
    pre = pre_tokenizers.Metaspace() if isinstance(decoder, decoders.Metaspace) else None
    text_decoder = word_level(decoder, vocab, pre)
    texts, _ = run(text_decoder, [vocab.index(p) for p in pieces], params())
    assert "".join(texts) == expected
    assert text_decoder.piece(2) == vocab[2] and text_decoder.piece(10_000) == ""


def test_unsupported_decoder_type():
    text_decoder = word_level(decoders.Replace("a", "b"), ["<unk>", "A", "hello"])
    with pytest.raises(DetokenizationError, match="^Unsupported tokenizer type: Replace$"):
        run(text_decoder, [2, 2], params())


def test_seq2seq_output_starts_as_a_fresh_sequence(llama):
    seq2seq = TextDecoder(llama.tokenizer, seq2seq=True)
    texts, _ = run(seq2seq, encode(llama, "there was a cat"), params())
    assert "".join(texts) == "there was a cat"
