"""ChatSession on tiny random models: the ledger, KV reuse, equivalence with re-prefill, cancel, limits, stats."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
from conftest import build_tiny_model, make_session

from fmchat.engine import ContextOverflow, EmptyPrompt, TextDelta, TurnDone, TurnStarted
from fmchat.engine.detok import StreamDecoder
from fmchat.engine.sampling import GenerationConfig, Sampler

TURNS = ["Hello! Who are you?", "What is the capital of France?", "Name three landmarks there.", "Thanks, bye!"]


def run_all(session, turns=TURNS):
    return [session.run_turn(t) for t in turns]


def assert_ledger_consistent(session):
    assert session.backend.cached_tokens() == len(session.ledger)
    # The ledger is a prefix of (rendered history + the tokens generated after it).
    last = session.messages[-1]
    prompt = session.backend.render(session.template_messages()[:-1])
    assert session.ledger[: len(prompt)] == prompt
    assert session.ledger[len(prompt) :] == last.token_ids[: len(session.ledger) - len(prompt)]


def test_kv_cache_on_equals_off_and_reuses_prefix(tiny_model):
    on = make_session(tiny_model, kv_cache=True)
    off = make_session(tiny_model, kv_cache=False)
    done_on, done_off = run_all(on), run_all(off)
    for a, b in zip(on.messages, off.messages):
        assert a.role == b.role and a.token_ids == b.token_ids and a.content == b.content
    assert all(m.token_ids for m in on.messages if m.role == "assistant")
    for i, (a, b) in enumerate(zip(done_on, done_off)):
        assert a.stats.prompt_tokens == b.stats.prompt_tokens
        assert b.stats.reused_tokens == 0 and b.stats.prefilled_tokens == b.stats.prompt_tokens
        assert a.stats.prefilled_tokens == a.stats.prompt_tokens - a.stats.reused_tokens
        if i > 0:  # everything up to the previous reply is reused
            prev = done_on[i - 1].stats
            assert a.stats.reused_tokens >= prev.prompt_tokens
            assert a.stats.prefilled_tokens < a.stats.prompt_tokens / 2
    assert_ledger_consistent(on)


# A template that renders earlier turns differently each turn: the system line counts the user turns,
# and earlier assistant replies are shortened to their first 3 words (as "thinking"-stripping templates do).
RERENDER_TEMPLATE = (
    "{% set n = messages | selectattr('role', 'equalto', 'user') | list | length %}"
    "<|im_start|>system\nturn {{ n }}<|im_end|>\n"
    "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}"
    "<|im_start|>assistant\n{{ m.content.split(' ')[:3] | join(' ') }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_template_that_rerenders_history_crops_the_cache(tmp_path, smol_tokenizer):
    model = build_tiny_model(tmp_path / "rerender", smol_tokenizer, chat_template=RERENDER_TEMPLATE)
    on = make_session(model, kv_cache=True)
    off = make_session(model, kv_cache=False)
    done_on, done_off = run_all(on), run_all(off)
    assert [m.token_ids for m in on.messages] == [m.token_ids for m in off.messages]
    for d in done_on[1:]:
        # the turn counter changes near the start, so only the first few tokens can be reused
        assert d.stats.reused_tokens < 8
        assert d.stats.prefilled_tokens == d.stats.prompt_tokens - d.stats.reused_tokens
    assert on.backend.cached_tokens() == len(on.ledger)


def test_incremental_prefill_matches_full_forward(tiny_model):
    s = make_session(tiny_model)
    b = s.backend
    ids = b.render([{"role": "user", "content": "The quick brown fox jumps over the lazy dog, again and again."}])
    full = b.forward(ids)
    b.truncate(0)
    b.forward(ids[:7])
    b.forward(ids[7:20])
    part = b.forward(ids[20:])
    torch.testing.assert_close(part, full, atol=1e-4, rtol=1e-4)
    b.truncate(10)
    assert b.cached_tokens() == 10
    again = b.forward(ids[10:])
    torch.testing.assert_close(again, full, atol=1e-4, rtol=1e-4)


def test_events_stream_text_that_adds_up_to_the_reply(tiny_model):
    s = make_session(tiny_model, max_new_tokens=24)
    events = list(s.turn("Tell me a story."))
    assert isinstance(events[0], TurnStarted) and isinstance(events[-1], TurnDone)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert deltas and "".join(d.text for d in deltas) == events[-1].reply
    assert [d.generated for d in deltas] == sorted(d.generated for d in deltas)
    assert s.messages[-1].content == events[-1].reply


def test_cancel_from_another_thread_keeps_a_consistent_session(tiny_model):
    s = make_session(tiny_model, max_new_tokens=1500, ctx=2048)
    seen = []
    for ev in s.turn("Write a very long essay."):
        if isinstance(ev, TextDelta):
            seen.append(ev.generated)
            if len(seen) == 3:
                t = threading.Thread(target=s.cancel)
                t.start()
                t.join()
        if isinstance(ev, TurnDone):
            done = ev
    assert done.stats.cancelled and done.stats.finish_reason == "cancelled"
    assert done.stats.generated_tokens <= seen[2] + 1  # stopped within one token of the request
    assert s.messages[-1].role == "assistant" and s.messages[-1].cancelled
    assert s.messages[-1].content == done.reply
    assert s.backend.cached_tokens() == len(s.ledger)
    nxt = s.run_turn("Shorter please.")
    assert not nxt.stats.cancelled and nxt.stats.generated_tokens > 0
    assert nxt.stats.reused_tokens > 0
    assert_ledger_consistent(s)


def test_prompt_that_does_not_fit_is_refused_and_the_session_is_intact(tiny_model):
    s = make_session(tiny_model, ctx=64)
    s.run_turn("Hi")
    before = [(m.role, m.content) for m in s.messages]
    ledger = list(s.ledger)
    with pytest.raises(ContextOverflow, match="context window is 64 tokens"):
        list(s.turn("word " * 100))
    assert [(m.role, m.content) for m in s.messages] == before and s.ledger == ledger
    with pytest.raises(EmptyPrompt):
        list(s.turn("   "))
    after = s.run_turn("ok").stats  # the refusals left the chat and its cache usable
    assert after.generated_tokens >= 1 and after.reused_tokens > 0


def test_decoding_stops_when_the_window_is_full(tiny_model):
    s = make_session(tiny_model, ctx=48, max_new_tokens=500)
    d = s.run_turn("Hi")
    assert d.stats.finish_reason in ("context", "stop")
    assert d.stats.ctx_used <= 48 and d.stats.ctx_size == 48


def test_stats_fields_are_measured(tiny_model):
    s = make_session(tiny_model, max_new_tokens=16)
    d = s.run_turn("Hello there")
    st = d.stats
    cfg = s.backend.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert st.seq_lens == [st.ctx_used] == [len(s.ledger)]
    assert st.kv_bytes == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * st.ctx_used * 4
    model = s.backend.model  # parameters plus buffers (quantized weights live in buffers)
    assert st.weights_bytes == sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])
    assert st.ttft_ms > 0 and st.total_ms >= st.ttft_ms
    assert st.prefill_tok_s and st.prefill_tok_s > 0
    assert st.generated_tokens == 16 and st.finish_reason == "length"
    assert st.decode_tok_s and st.decode_tok_s > 0
    assert 0 < st.rss_mb <= st.peak_rss_mb + 1
    assert st.gpu_mem_mb is None and st.device == "cpu" and st.dtype == "float32"
    assert set(st.to_dict()) >= {"prompt_tokens", "reused_tokens", "prefilled_tokens", "ctx_size", "kv_bytes"}


def test_reset_retry_and_switching_backend_keep_working(tiny_model):
    from fmchat.config import RunConfig
    from fmchat.conversation import load_backend

    s = make_session(tiny_model)
    s.run_turn("first")
    s.run_turn("second")
    assert s.pop_last_exchange() == "second"
    assert [m.role for m in s.messages] == ["user", "assistant"]
    eager = load_backend(RunConfig(model=str(tiny_model), device="cpu", dtype="float32", kernel="eager"))
    s.replace_backend(eager)
    d = s.run_turn("second")
    assert d.stats.reused_tokens == 0 and d.stats.prompt_tokens > 20  # the whole transcript was re-prefilled
    s.reset()
    assert s.messages == [] and s.ledger == [] and s.backend.cached_tokens() == 0


def test_seeded_sampling_is_reproducible(tiny_model):
    a = make_session(tiny_model, temperature=1.0, seed=7)
    b = make_session(tiny_model, temperature=1.0, seed=7)
    c = make_session(tiny_model, temperature=1.0, seed=8)
    ra, rb, rc = (x.run_turn("Hello") for x in (a, b, c))
    assert ra.reply == rb.reply
    assert a.messages[-1].token_ids != c.messages[-1].token_ids


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0])
    s = Sampler(GenerationConfig(temperature=1.0, top_p=0.5, seed=0))
    assert {int(s(logits)) for _ in range(50)} == {0}
    s = Sampler(GenerationConfig(temperature=1.0, top_p=0.99, seed=0))
    assert {int(s(logits)) for _ in range(200)} >= {0, 1}
    greedy = Sampler(GenerationConfig(temperature=0.0))
    assert int(greedy(torch.tensor([0.1, 0.3, 0.2]))) == 1


def test_stream_decoder_handles_multibyte_text(smol_tokenizer):
    text = "Größe: 世界 🙂 naïve café — done."
    ids = smol_tokenizer.encode(text, add_special_tokens=False)
    d = StreamDecoder(lambda x: smol_tokenizer.decode(list(x), skip_special_tokens=True, clean_up_tokenization_spaces=False))
    parts = [d.push(i) for i in ids]
    parts.append(d.flush())
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts)


@pytest.mark.parametrize("arch", ["phi3", "qwen2"])
def test_other_architectures_reuse_the_cache_identically(tiny_models, arch):
    on = make_session(tiny_models[arch], kv_cache=True, max_new_tokens=8)
    off = make_session(tiny_models[arch], kv_cache=False, max_new_tokens=8)
    run_all(on, TURNS[:3])
    run_all(off, TURNS[:3])
    assert [m.token_ids for m in on.messages] == [m.token_ids for m in off.messages]
    assert on.messages[-1].stats.reused_tokens > 0


def test_model_resolution_errors(tmp_path, tiny_model):
    from fmchat import models

    with pytest.raises(models.ModelNotFound, match="unknown model 'no-such-model'"):
        models.resolve("no-such-model")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(models.ModelNotFound, match="neither a .gguf file nor"):
        models.resolve(str(tmp_path / "notes.txt"))
    src = models.resolve("some-org/some-model")
    assert src.kind == "hub"
    with pytest.raises(models.ModelNotFound, match="not in the Hugging Face cache"):
        models.local_dir(src)
    assert models.resolve(str(tiny_model)).kind == "hf_dir"
    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    assert models.resolve(str(copy)).path == copy.resolve()
