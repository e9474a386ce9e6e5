"""Request fields this session's hostile-input review touched, through the real clients people
use: the `openai` client (a participant's name, tool results linked to their calls, prompt
log-probs refused on a chat stream, parallel_tool_calls), the `anthropic` client (echoed
citations and cache_control accepted, a tool_choice naming a tool without type "tool" refused)
and LangChain (content blocks carrying their own ids)."""

from __future__ import annotations

import anthropic
import openai
import pytest

ASK = [{"role": "user", "content": "What is the capital of France?"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def test_openai_client(oai, model):
    named = oai.chat.completions.create(model=model, max_tokens=2, temperature=0, messages=[
        {"role": "user", "content": "Hi, I am asking.", "name": "Bob"}])
    assert named.usage.prompt_tokens > oai.chat.completions.create(
        model=model, max_tokens=2, temperature=0,
        messages=[{"role": "user", "content": "Hi, I am asking."}]).usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=model, max_tokens=2, messages=[
            *ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_2", "content": "Paris"}])
    assert err.value.body["param"] == "messages[2].tool_call_id"
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=model, max_tokens=2, messages=ASK, stream=True,
                                    extra_body={"prompt_logprobs": 1})
    assert err.value.body["param"] == "prompt_logprobs"


def test_anthropic_client(server):
    claude = anthropic.Anthropic(base_url=server.url, api_key=server.api_key, max_retries=0)
    model = "SmolLM2-135M-Instruct"
    block = {"type": "text", "text": "Hi", "citations": None,
             "cache_control": {"type": "ephemeral"}}
    reply = claude.messages.create(model=model, max_tokens=2,
                                   messages=[{"role": "user", "content": [block]}])
    assert reply.type == "message"
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=model, max_tokens=2, messages=ASK, tools=[{
            "name": "g", "input_schema": {"type": "object"}}], tool_choice={"type": "auto",
                                                                              "name": "g"})
    assert "tool_choice" in err.value.body["error"]["message"]


def test_langchain_content_blocks_with_ids(server):
    langchain_openai = pytest.importorskip("langchain_openai")  # a dev extra: always installed
    from langchain_core.messages import HumanMessage

    llm = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key=server.api_key,
                                      model="SmolLM2-135M-Instruct", temperature=0,
                                      max_tokens=2, max_retries=0)
    reply = llm.invoke([HumanMessage(content=[{"type": "text", "text": "Hi", "id": "lc_1"}])])
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
