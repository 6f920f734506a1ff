"""The bash format: a reply's one code block becomes the calls it stands for, or a correction."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import task_doc
from inmemory import InMemorySandbox, ScriptedModel, reply, shell
from llmserver import ScriptedLLMServer, text
from sandbox_agent.bashblocks import NO_BLOCK, parse_bash_reply
from sandbox_agent.task import ToolCallFormat
from test_loop import run_loop

W = "/workspace"


def commands(text: str) -> list[tuple[str, dict[str, str]]]:
    parsed = parse_bash_reply(text, W)
    assert parsed.correction is None
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


def test_one_bash_block_is_one_command() -> None:
    text = "Let me look.\n```bash\nls input\nwc -l input/data.txt\n```\n"
    assert commands(text) == [("execute_bash", {"command": "ls input\nwc -l input/data.txt"})]


def test_submit_ends_the_block_and_its_words_are_the_answer_as_the_shell_reads_them() -> None:
    text = '```bash\npython3 solve.py > out.txt\nsubmit "$(cat out.txt)"\necho never\n```'
    write = f'set -- "$(cat out.txt)"; printf "%s\\n" "$*" > {W}/output/answer.txt'

    assert commands(text) == [
        ("execute_bash", {"command": f"python3 solve.py > out.txt\n{write}"}),
        ("submit", {}),
    ]
    assert commands("```bash\nsubmit\n```") == [("submit", {})]  # the answer file's content


def test_a_python_block_runs_with_python3() -> None:
    ((name, args),) = commands("```python\nprint(2**20)\n```")
    assert name == "execute_bash"
    assert args["command"] == "python3 - <<'LLMSANDBOX_PY_END'\nprint(2**20)\nLLMSANDBOX_PY_END"


def test_output_fences_are_not_code_and_a_reply_without_code_gets_a_correction() -> None:
    # What the small model writes: code to run, then what it imagines the output is.
    text = "```bash\necho 100\n```\nIt prints:\n```\n100\n```"
    assert commands(text) == [("execute_bash", {"command": "echo 100"})]
    assert parse_bash_reply("The answer is 100.", W).correction == NO_BLOCK


@pytest.mark.parametrize(
    "text", ["```bash\nls\n```\n```bash\npwd\n```", "```bash\nls\n```\n```python\nprint(1)\n```"]
)
def test_several_blocks_run_nothing_and_say_so(text: str) -> None:
    parsed = parse_bash_reply(text, W)
    assert parsed.calls == []
    assert parsed.correction == (
        "Your reply had 2 code blocks, so none of them ran. Put everything to run next into "
        "one ```bash block."
    )


def test_the_loop_runs_blocks_shows_plain_output_and_ends_on_submit() -> None:
    sandbox = InMemorySandbox(commands={"echo $((6 * 7))": shell("42\n")})
    sandbox.files["output/answer.txt"] = "42\n"  # what the submit line's command writes
    model = ScriptedModel(
        reply("I think it is 42."),
        reply("```bash\necho $((6 * 7))\n```"),
        reply("```bash\nsubmit 42\n```"),
    )
    run = run_loop(model, sandbox, fmt=ToolCallFormat.BASH)
    first = run.model.requests[0]
    assert first.tools is None
    assert "exactly one ```bash code block" in first.messages[0]["content"]
    assert "str_replace_editor" not in first.messages[0]["content"]
    assert run.model.requests[1].messages[-1] == {"role": "user", "content": NO_BLOCK}
    assert run.model.requests[2].messages[-1] == {"role": "user", "content": "[exit code 0]\n42"}
    assert run.result.exit_reason == "submitted"
    assert run.result.answer == "42"
    assert sandbox.ran[-1] == f'set -- 42; printf "%s\\n" "$*" > {W}/output/answer.txt'
    assert [c.name for s in run.trajectory.steps for c in s.tool_calls] == [
        "execute_bash",
        "execute_bash",
        "submit",
    ]


def test_a_real_shell_computes_and_submits_the_answer(
    run_local: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.script(
        text("```bash\ncat > solve.py <<'EOF'\nprint(sum(range(101)))\nEOF\n```"),
        text('Now submit it.\n```bash\nsubmit "$(python3 solve.py)"\n```'),
    )
    outcome = run_local(task_doc(model={"toolCallFormat": "bash"}))
    assert outcome.result.exit_reason == "submitted", outcome.result.message
    assert outcome.result.answer == "5050"
    assert (outcome.output_dir / "answer.txt").read_text() == "5050\n"
    assert "tools" not in (llm_server.chat_requests[0].json or {})
