"""Chat templates (fmchat/templates.py): the built-ins, the choice (--chat-template > the model's own > picked from
the model's tokens and architecture), and a base GGUF without a template chatting through the real CLI on both
backends.

The base GGUF is the default model's GGUF rewritten (gguf's GGUFReader + GGUFWriter) without
``tokenizer.chat_template`` and with ``<|endoftext|>`` as its end-of-sequence token, as a base model's is: then only
the picked template's ``<|im_end|>`` can end a reply. The transformers backend converts it once per test session.
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from fmchat import templates
from fmchat.cli import app as cli_app
from fmchat.config import RunConfig
from fmchat.errors import UserError

runner = CliRunner()
BUILTIN_NAMES = "chatml, llama3, phi3, gemma, mistral"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]
# What each built-in makes of CONVERSATION with the assistant prompt (bos "<s>", eos "</s>").
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    "Hello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>"
    "\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user"
    "<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nBye<|end|>\n"
    "<|assistant|>\n",
    "gemma": "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] Bye [/INST]",
}
# ... and without it (the last assistant prompt is the only difference; mistral's prompt is its [/INST]).
GENERATION_PROMPT = {"chatml": "<|im_start|>assistant\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                     "phi3": "<|assistant|>\n", "gemma": "<start_of_turn>model\n", "mistral": ""}  # fmt: skip


def render(source: str, messages, add_generation_prompt=True, bos="<s>", eos="</s>") -> str:
    return templates._compile(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                             bos_token=bos, eos_token=eos)  # fmt: skip


# ---------------------------------------------------------------- the built-ins
def test_the_builtins_are_the_five_named():
    assert ", ".join(templates.BUILTINS) == BUILTIN_NAMES


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_builtin_renders_system_user_assistant_and_the_generation_prompt(name):
    source = templates.BUILTINS[name].source
    assert render(source, CONVERSATION) == EXPECTED[name]
    without = render(source, CONVERSATION, add_generation_prompt=False)
    assert without + GENERATION_PROMPT[name] == EXPECTED[name]
    # Each turn only appends: an earlier rendering (without the prompt) is a prefix of a later one, so the KV
    # cache's ledger is reused turn after turn.
    for n in range(2, len(CONVERSATION)):
        assert EXPECTED[name].startswith(render(source, CONVERSATION[:n], add_generation_prompt=False)), (name, n)
    # No system prompt: nothing of it is left behind; no bos token: nothing written for it.
    assert "Be brief" not in render(source, CONVERSATION[1:])
    assert "None" not in render(source, CONVERSATION, bos=None, eos=None)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_both_backends_renderers_agree_on_each_builtin(name, smol_tokenizer):
    """transformers' apply_chat_template and llama-cpp-python's Jinja2ChatFormatter give the same text."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    source = templates.BUILTINS[name].source
    hf = smol_tokenizer.apply_chat_template(CONVERSATION, chat_template=source, tokenize=False,
                                            add_generation_prompt=True, bos_token="<s>", eos_token="</s>")  # fmt: skip
    llama = Jinja2ChatFormatter(source, eos_token="</s>", bos_token="<s>")(messages=CONVERSATION).prompt
    assert hf == llama == EXPECTED[name]


# ---------------------------------------------------------------- the choice
@pytest.mark.parametrize(
    "architecture, vocab, picked",
    [
        ("llama", {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}, "chatml"),
        ("gemma2", {"<bos>", "<start_of_turn>", "<end_of_turn>"}, "gemma"),
        ("llama", {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}, "llama3"),
        ("llama", {"<s>", "<|user|>", "<|assistant|>", "<|end|>"}, "phi3"),
        ("llama", {"<s>", "[INST]", "[/INST]"}, "mistral"),
        ("gemma3", {"<bos>", "<eos>"}, "gemma"),  # no telling token: the architecture
        ("phi3", {"<s>"}, "phi3"),
        ("mistral", {"<s>"}, "mistral"),
        ("qwen2", {"<|endoftext|>"}, "chatml"),
        ("llama", {"<s>", "</s>"}, "chatml"),  # nothing says: chatml, as llama.cpp does
        (None, set(), "chatml"),
        ("gemma", {"<|im_start|>", "<|im_end|>"}, "chatml"),  # the tokens say more than the architecture
    ],
)
def test_a_model_without_a_template_gets_one_picked_from_its_tokens_then_its_architecture(architecture, vocab, picked):
    t = templates.resolve(None, None, architecture, vocab)
    assert t.name == picked and t.source == templates.BUILTINS[picked].source
    assert not t.own and t.describe().startswith(f"{picked} (built-in: the model has none; ")


def test_the_flag_wins_over_the_models_own_which_wins_over_a_pick(tmp_path):
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    vocab = {"<start_of_turn>", "<end_of_turn>"}
    assert templates.resolve(None, own, "gemma", vocab).describe() == "the model's own"
    assert templates.resolve(None, own, "gemma", vocab).own
    flagged = templates.resolve("phi3", own, "gemma", vocab)
    assert flagged.name == "phi3" and flagged.describe() == "phi3 (built-in, --chat-template)" and not flagged.own
    f = tmp_path / "mine.jinja"
    f.write_text(own)
    from_file = templates.resolve(str(f), None, "gemma", vocab)
    assert from_file.source == own and from_file.describe() == f"{f} (--chat-template)"
    assert templates.own_template({"default": own, "tool_use": "x"}) == own  # a named set: its default
    assert templates.own_template("   ") is None


def test_the_end_of_turn_token_stops_where_the_vocabulary_has_it():
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    chatml = templates.resolve(None, None, "llama", vocab)
    assert templates.stop_ids(chatml, vocab.get) == {2}
    assert templates.stop_ids(templates.from_choice("phi3"), vocab.get) == set()  # no <|end|> here: the model's eos
    assert templates.stop_ids(templates.from_choice("mistral"), vocab.get) == set()  # ends with the eos itself


def test_a_bad_chat_template_is_one_line_naming_the_builtins(tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    empty = tmp_path / "empty.jinja"
    empty.write_text("\n")
    cases = {"chatlm": "unknown name", str(tmp_path / "missing.jinja"): "no such file",
             str(broken): "not a valid Jinja template", str(empty): "the file is empty"}  # fmt: skip
    for value, why in cases.items():
        problems = RunConfig(chat_template=value).validate()
        assert len(problems) == 1 and problems[0].startswith(f"--chat-template '{value}': {why}"), problems
        assert f"(built-ins: {BUILTIN_NAMES}; or a .jinja file)" in problems[0] and "\n" not in problems[0]
        with pytest.raises(UserError):
            templates.from_choice(value)
    assert RunConfig(chat_template="gemma").validate() == []


# ---------------------------------------------------------------- a base GGUF through the CLI
@pytest.fixture(scope="session")
def base_gguf(tmp_path_factory, default_gguf):
    """The default model's GGUF without a chat template, its eos set to <|endoftext|> (id 0) as a base model's."""
    import gguf

    reader = gguf.GGUFReader(str(default_gguf))
    assert reader.get_field("tokenizer.chat_template") is not None
    out = tmp_path_factory.mktemp("base-gguf") / "smollm2-base.gguf"
    writer = gguf.GGUFWriter(
        str(out), arch=reader.get_field("general.architecture").contents(), endianess=reader.endianess
    )
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "tokenizer.chat_template"):
            continue
        kind = f.types[0]
        value = 0 if f.name == "tokenizer.ggml.eos_token_id" else f.contents()
        writer.add_key_value(f.name, value, kind, sub_type=f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    check = gguf.GGUFReader(str(out))
    assert check.get_field("tokenizer.chat_template") is None and len(check.tensors) == len(reader.tensors)
    assert check.get_field("tokenizer.ggml.eos_token_id").contents() == 0
    return out


def cli(*args, input=None):
    return runner.invoke(cli_app, [str(a) for a in args], input=input)


def template_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "chat template:" in line]


def json_rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


AUTO = "chatml (built-in: the model has none; its vocabulary has <|im_start|>)"


@pytest.fixture(scope="session")
def first_run(base_gguf):
    """The first transformers run on the base GGUF: it converts it (once per test session)."""
    return cli("run", "--model", base_gguf, "Hello", "--max-new-tokens", "8", "--temperature", "0", "--no-save")


def test_a_base_gguf_chats_with_a_picked_template_decided_before_the_conversion(first_run):
    r = first_run
    assert r.exit_code == 0, r.output
    assert r.stdout.strip(), "no reply"
    assert template_lines(r.stderr) == [f"[fmchat] chat template: {AUTO}"]  # said once
    steps = r.stderr.splitlines()
    metadata = steps.index("[fmchat] reading GGUF metadata (chat template)")
    converting = next(i for i, line in enumerate(steps) if line.startswith("[fmchat] converting "))
    assert metadata < converting  # the template was chosen from the GGUF's metadata before the conversion ran
    # The reply ended on chatml's <|im_end|> (the model's own eos is <|endoftext|>), not on the token limit.
    assert "<|im" not in r.stdout and "im_start" not in r.stdout
    (generated,) = re.findall(r"^\[(\d+) tokens · ", r.stderr, re.MULTILINE)
    assert 0 < int(generated) < 8


def test_a_converted_copy_gets_the_same_pick_as_the_gguf_metadata(first_run, base_gguf):
    """Later loads read the converted copy (tokenizer and config.json), not the GGUF: the same template is picked."""
    from transformers import AutoTokenizer

    from fmchat.backends.transformers.backend import _model_type
    from fmchat.backends.transformers.gguf import converted_dir

    assert first_run.exit_code == 0, first_run.output
    copy = converted_dir(base_gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(copy))
    assert templates.own_template(tokenizer.chat_template) is None
    picked = templates.resolve(None, None, _model_type(copy), tokenizer.get_vocab())
    assert picked == templates.for_gguf(base_gguf, None) and picked.describe() == AUTO
    assert templates.stop_ids(picked, tokenizer.get_vocab().get) == {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert tokenizer.eos_token == "<|endoftext|>"  # the base model's own eos would not end a chatml turn


def test_chat_template_flag_and_file_override_the_pick(first_run, base_gguf, tmp_path):
    assert first_run.exit_code == 0, first_run.output
    r = cli("run", "--model", base_gguf, "Hello", "--max-new-tokens", "8", "--temperature", "0", "--no-save", "--json",
            "--chat-template", "chatml")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert template_lines(r.stderr) == ["[fmchat] chat template: chatml (built-in, --chat-template)"]
    (chatml,) = json_rows(r.stdout)
    assert chatml["reply"].strip() and chatml["finish_reason"] == "stop"

    plain = tmp_path / "plain.jinja"
    plain.write_text("{%- for m in messages -%}{{ (m['role'] | upper) ~ ': ' ~ m['content'] ~ '\\n' }}{%- endfor -%}"
                     "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}")  # fmt: skip
    r = cli("run", "--model", base_gguf, "Hello", "--max-new-tokens", "4", "--temperature", "0", "--no-save", "--json",
            "--chat-template", plain)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert template_lines(r.stderr) == [f"[fmchat] chat template: {plain} (--chat-template)"]
    (row,) = json_rows(r.stdout)
    # "USER: Hello\nASSISTANT:" is not chatml's "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert row["prompt_tokens"] != chatml["prompt_tokens"]


@pytest.mark.parametrize(
    "value, why",
    [("chatlm", "unknown name"), ("nowhere/t.jinja", "no such file"), ("{broken}", "not a valid Jinja template")],
)
def test_a_bad_chat_template_fails_in_one_line_before_any_conversion(value, why, base_gguf, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FMCHAT_CACHE_DIR", str(cache))  # where a conversion would write
    if value == "{broken}":
        value = str(tmp_path / "broken.jinja")
        (tmp_path / "broken.jinja").write_text("{% if messages %}no end")
    for args in (["run", "Hello", "--no-save"], ["chat", "--plain", "--no-save"]):
        r = cli(*args, "--model", base_gguf, "--chat-template", value, input="/quit\n")
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"fmchat: error: --chat-template '{value}': {why}"), lines
        assert BUILTIN_NAMES in lines[0]
    assert not cache.exists()  # nothing was converted (nor even looked for)


def test_the_llamacpp_backend_chats_on_the_base_gguf_with_the_same_choice(base_gguf, default_gguf):
    r = cli("run", "--backend", "llamacpp", "--model", base_gguf, "Hello", "--max-new-tokens", "8", "--temperature", "0",
            "--no-save", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert template_lines(r.stderr) == [f"[fmchat] chat template: {AUTO}"]
    (auto,) = json_rows(r.stdout)
    assert auto["reply"].strip() and auto["finish_reason"] == "stop" and "<|im" not in auto["reply"]

    r = cli("run", "--backend", "llamacpp", "--model", base_gguf, "Hello", "--max-new-tokens", "2", "--no-save", "--json",
            "--chat-template", "gemma")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert template_lines(r.stderr) == ["[fmchat] chat template: gemma (built-in, --chat-template)"]
    assert json_rows(r.stdout)[0]["prompt_tokens"] != auto["prompt_tokens"]

    # chat --plain says it once too.
    r = cli("chat", "--plain", "--no-save", "--backend", "llamacpp", "--model", base_gguf, input="/quit\n")
    assert r.exit_code == 0, r.output
    assert template_lines(r.stderr) == [f"[fmchat] chat template: {AUTO}"]

    # A model with its own template keeps it, silently; --chat-template chatml overrides it (SmolLM2's own template
    # adds a default system prompt, plain chatml does not).
    r = cli(
        "run", "--backend", "llamacpp", "--model", default_gguf, "Hello", "--max-new-tokens", "2", "--no-save", "--json"
    )
    assert r.exit_code == 0, r.output
    assert template_lines(r.stderr) == []
    (own,) = json_rows(r.stdout)
    r = cli("run", "--backend", "llamacpp", "--model", default_gguf, "Hello", "--max-new-tokens", "2", "--no-save", "--json",
            "--chat-template", "chatml")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert template_lines(r.stderr) == ["[fmchat] chat template: chatml (built-in, --chat-template)"]
    assert json_rows(r.stdout)[0]["prompt_tokens"] < own["prompt_tokens"]


# ---------------------------------------------------------------- the app: settings pane and panel
async def test_the_settings_pane_takes_a_template_and_the_panel_shows_it(tiny_model):
    from textual.widgets import Input

    from fmchat.tui.app import FmchatApp
    from fmchat.tui.screens.settings import SettingsScreen
    from fmchat.tui.widgets.panel import InferencePanel

    config = RunConfig(model=str(tiny_model), device="cpu", dtype="float32", temperature=0.0, max_new_tokens=4)
    app = FmchatApp(config, persist=False)

    async def until(pilot, cond, what):
        for _ in range(3000):
            if cond():
                return
            await pilot.pause(0.01)
        raise AssertionError(f"never happened: {what}")

    def template_row() -> str:
        return dict(app.query_one(InferencePanel).running_rows())["template"]

    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.ready, "model loaded")
        assert template_row() == "the model's own"
        first = app.conversation.backend
        own_prompt = first.render([{"role": "user", "content": "Hi"}])
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, SettingsScreen), "settings open")
        field = app.screen.query_one("#set-chat_template", Input)
        assert field.value == "" and field.placeholder.startswith("the model's own")
        field.value = "chatlm"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, SettingsScreen)  # refused, with the reason
        assert f"unknown name (built-ins: {BUILTIN_NAMES}" in str(app.screen.query_one("#settings-error").render())
        field.value = "gemma"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: app.conversation.backend is not first and app.ready, "reloaded")
        await pilot.pause()
        backend = app.conversation.backend
        assert backend.chat_template == "gemma (built-in, --chat-template)"
        assert template_row() == "gemma (built-in, --chat-template)"
        assert backend.render([{"role": "user", "content": "Hi"}]) != own_prompt
