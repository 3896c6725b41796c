"""runtime.chat: Mixtral's format, the real Mixtral template, and hostile templates."""
from __future__ import annotations

import os
import time

import pytest

from lazymoe.format.chat_templates import MIXTRAL_8X7B_TEMPLATE
from lazymoe.runtime.chat import MAX_SECONDS, mixtral_prompt, render_chat

TWO_TURNS = [
    {"role": "user", "content": "Hello, who are you?"},
    {"role": "assistant", "content": "I am a bot."},
    {"role": "user", "content": "Tell me a joke."},
]
SYSTEM = [{"role": "system", "content": "Be brief."}]


def test_default_format():
    assert render_chat(TWO_TURNS, None, "<s>", "</s>") == (
        "<s> [INST] Hello, who are you? [/INST] I am a bot.</s> [INST] Tell me a joke. [/INST]")
    assert render_chat(SYSTEM + TWO_TURNS[:1], None, "<s>", "</s>") == (
        "<s> [INST] Be brief.\n\nHello, who are you? [/INST]")


@pytest.mark.parametrize("messages", [TWO_TURNS, SYSTEM + TWO_TURNS, TWO_TURNS[:1], TWO_TURNS[:2]])
def test_real_template_renders_like_default(messages):
    expected = mixtral_prompt(messages, "<s>", "</s>")
    assert render_chat(messages, MIXTRAL_8X7B_TEMPLATE, "<s>", "</s>") == expected
    assert render_chat(messages, MIXTRAL_8X7B_TEMPLATE, "<s>", "</s>", add_generation_prompt=False) == expected


def test_rendered_prompt_tokenizes_like_mistral_common():
    """render_chat + encode(bos=False, special=True) == mistral_common's chat tokens (8x7B)."""
    mistral_common = pytest.importorskip("mistral_common")
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from lazymoe.quantize.spm_model import load_spm_model
    from lazymoe.runtime.tokenizer import Tokenizer

    m = load_spm_model(os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1"))
    tok = Tokenizer(m.pieces, m.scores, m.types, m.bos_id, m.eos_id, m.unk_id)
    cls = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    for messages in (TWO_TURNS, SYSTEM + TWO_TURNS):
        ref = MistralTokenizer.v1().encode_chat_completion(
            ChatCompletionRequest(messages=[cls[x["role"]](content=x["content"]) for x in messages]))
        prompt = render_chat(messages, MIXTRAL_8X7B_TEMPLATE, "<s>", "</s>")
        assert tok.encode(prompt, bos=False, special=True) == ref.tokens


def test_template_role_errors_become_value_errors():
    bad = [TWO_TURNS[0], TWO_TURNS[0]]
    with pytest.raises(ValueError, match="chat template raised an error: After the optional system"):
        render_chat(bad, MIXTRAL_8X7B_TEMPLATE, "<s>", "</s>")
    with pytest.raises(ValueError, match="alternate user/assistant"):
        render_chat(bad, None, "<s>", "</s>")
    with pytest.raises(ValueError, match="must be followed by a user"):
        render_chat(SYSTEM, None, "<s>", "</s>")


@pytest.mark.parametrize("messages, words", [
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    ([{"role": "user"}], "exactly the keys"),
    ([{"role": "user", "content": "a", "name": "x"}], "exactly the keys"),
    ([{"role": "tool", "content": "a"}], "role 'tool'"),
    ([{"role": "user", "content": 3}], "content must be a str"),
    (["user: hi"], "exactly the keys"),
])
def test_messages_validated(messages, words):
    for template in (None, MIXTRAL_8X7B_TEMPLATE):
        with pytest.raises(ValueError, match=words):
            render_chat(messages, template, "<s>", "</s>")


def test_globals_and_filters_like_hugging_face():
    t = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
         "|{{ strftime_now('%Y')|length }}|{{ messages[0]|tojson }}|{{ add_generation_prompt }}")
    assert render_chat(TWO_TURNS, t, "<s>", "</s>") == (
        'Hello, who are you?|4|{"role": "user", "content": "Hello, who are you?"}|True')


HOSTILE = [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ lipsum.__globals__['os'].system('true') }}",
    "{{ self.__init__.__globals__ }}",
    "{{ namespace.__init__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ messages.append('x') }}",
    "{{ messages[0].update(role='system') }}",
    "{{ ''['__class__'] }}",
    "{{ (''|attr('__class__')) }}",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_templates_refused(template):
    with pytest.raises(ValueError, match="chat template was refused"):
        render_chat(TWO_TURNS, template, "<s>", "</s>")


RESOURCE_HOGS = [
    "{{ 'x' * 1000000000 }}",
    "{{ 2 ** 1000000000 }}",
    "{{ 'x'.center(1000000000) }}",
    "{{ 'x'|center(1000000000) }}",
    "{{ '%1000000000d' % 1 }}",
    "{{ '{:>1000000000}'.format(1) }}",
    "{% for i in range(1000000000) %}x{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{{ ('x' * 999999)|replace('', 'y' * 999999) }}",
    "{{ ('x\n' * 400000)|indent(100000) }}",
    "{{ (['x' * 99999] * 9)|join('y' * 999999) }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
]


@pytest.mark.parametrize("template", RESOURCE_HOGS)
def test_resource_hogs_refused_quickly(template):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="chat template was refused"):
        render_chat(TWO_TURNS, template, "<s>", "</s>")
    assert time.perf_counter() - t0 < MAX_SECONDS + 1


def test_silent_loop_hits_deadline():
    t = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="longer than"):
        render_chat(TWO_TURNS, t, "<s>", "</s>")
    assert time.perf_counter() - t0 < MAX_SECONDS + 1


def test_output_cap_is_configurable():
    with pytest.raises(ValueError, match="exceeds 100 characters"):
        render_chat(TWO_TURNS, "{% for i in range(1000) %}x{% endfor %}", "<s>", "</s>", max_chars=100)


@pytest.mark.parametrize("template, words", [
    ("{% for %}", "syntax error at line 1"),
    ("{% if x %}", "syntax error"),
    ("{{ raise_exception('no tools here') }}", "raised an error: no tools here"),
    ("{{ messages[0]['content'] + 1 }}", "failed to render: TypeError"),
    (3, "must be a str"),
])
def test_template_errors_are_value_errors(template, words):
    with pytest.raises(ValueError, match=words):
        render_chat(TWO_TURNS, template, "<s>", "</s>")
