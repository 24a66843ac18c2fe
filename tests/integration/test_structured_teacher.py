"""Structured outputs from the real SmolLM2 teacher behind a real gateway, asked with the
official SDK: a JSON-schema classification of finance headlines (every answer schema-valid,
sent concurrently so constrained and free rows share batches), `.parse()` with a pydantic
model, and json_object. bench/structured measures the same task at N=100 with a baseline."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from models.tasks import get_task
from tests.servers import gateway

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TEACHER = "smollm2-135m-instruct"
TASK = get_task("finance-headlines")
SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": list(TASK.labels)}},
    "required": ["label"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "event", "schema": SCHEMA, "strict": True}}


class Sentiment(BaseModel):
    sentiment: Literal["positive", "negative", "neutral"]
    confident: bool


@pytest.fixture(scope="module")
def sdk(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    config = {
        "models": [{"name": TEACHER, "backend": "local", "role": "teacher",
                    "path": str(teacher_dir), "context_length": 512}],
        "limits": {"max_tokens": 64, "default_max_tokens": 32},
        "traffic": {"enabled": False},
    }  # fmt: skip
    with (
        gateway(config, tmp_path_factory.mktemp("structured-teacher")) as srv,
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=300) as c,
    ):
        yield c


def classify(sdk: openai.OpenAI, prompt: str, constrained: bool):
    return sdk.chat.completions.create(
        model=TEACHER, messages=[{"role": "user", "content": prompt}], temperature=0,
        max_tokens=24, **({"response_format": FORMAT} if constrained else {}),
    )  # fmt: skip


def test_every_constrained_classification_is_schema_valid(sdk: openai.OpenAI) -> None:
    prompts = [e.prompt for e in TASK.examples("test", 12)]
    jobs = [(p, i % 3 != 2) for i, p in enumerate(prompts)]  # every third one unconstrained
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: classify(sdk, *job), jobs))
    for (_, constrained), out in zip(jobs, answers, strict=True):
        if constrained:
            assert out.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
        else:  # free rows in the same batches stay free text
            assert not out.choices[0].message.content.startswith('{"label"')


def test_parse_with_a_pydantic_model(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.parse(
        model=TEACHER, response_format=Sentiment, temperature=0,
        messages=[{"role": "user", "content": "Shares of Acme soared 40% today. Sentiment?"}],
    )  # fmt: skip
    assert isinstance(out.choices[0].message.parsed, Sentiment)


def test_json_object(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.create(
        model=TEACHER, temperature=0, max_tokens=64, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
    )  # fmt: skip
    assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
    assert isinstance(json.loads(out.choices[0].message.content), dict)
