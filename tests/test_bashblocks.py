"""The bash format: a reply's one code block becomes the calls it stands for, or a correction."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import task_doc
from inmemory import InMemorySandbox, ScriptedModel, reply, shell
from llmserver import ScriptedLLMServer, text
from sandbox_agent.bashblocks import (
    NO_BARE_PYTHON,
    NO_BLOCK,
    NOT_A_COMMAND,
    PYTHON_C_HINT,
    SEVERAL_BLOCKS,
    SUBMIT_NOT_ALONE,
    closed,
    hint,
    parse_bash_reply,
)
from sandbox_agent.loop import REPEATED_BLOCK
from sandbox_agent.task import ToolCallFormat
from sandbox_agent.tools import EMPTY_SUBMIT
from test_loop import run_loop

W = "/workspace"


def commands(text: str) -> list[tuple[str, dict[str, object]]]:
    parsed = parse_bash_reply(text, W)
    assert parsed.correction is None
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


def test_one_bash_block_is_one_command() -> None:
    text = "Let me look.\n```bash\nls input\nwc -l input/data.txt\n```\n"
    assert commands(text) == [("execute_bash", {"command": "ls input\nwc -l input/data.txt"})]


def test_submit_alone_is_the_answer_as_the_shell_reads_its_words() -> None:
    text = '```bash\n# done\nsubmit "$(cat out.txt)"\necho never\n```'
    write = f'set -- "$(cat out.txt)"; printf "%s\\n" "$*" > {W}/output/answer.txt'
    assert commands(text) == [
        ("execute_bash", {"command": write}),
        ("submit", {"from_answer_file": True}),
    ]
    # Bare, it submits what the model wrote to the answer file itself.
    assert commands("```bash\nsubmit\n```") == [("submit", {"from_answer_file": True})]


def test_submit_beside_other_commands_runs_them_and_submits_nothing() -> None:
    parsed = parse_bash_reply("```bash\npython3 solve.py\nsubmit 1234567890\n```", W)
    assert [(c.name, c.error) for c in parsed.calls] == [
        ("execute_bash", None),
        ("", SUBMIT_NOT_ALONE),
    ]
    assert json.loads(parsed.calls[0].arguments) == {"command": "python3 solve.py"}


def test_submit_beside_commands_counts_when_an_earlier_output_showed_that_answer() -> None:
    block = "```bash\npython3 -c 'print(6 * 7)'\nsubmit 42\n```"
    shown = {"42"}
    parsed = parse_bash_reply(block, W, shown.__contains__)
    assert [c.name for c in parsed.calls] == ["execute_bash", "execute_bash", "submit"]
    assert json.loads(parsed.calls[0].arguments) == {"command": "python3 -c 'print(6 * 7)'"}
    # Not seen: still a guess.
    assert parse_bash_reply(block, W, {"41"}.__contains__).calls[-1].error == SUBMIT_NOT_ALONE


def test_submit_fenced_as_python_is_still_the_submit_command() -> None:
    assert commands("```python\nsubmit 42\n```") == [
        ("execute_bash", {"command": f'set -- 42; printf "%s\\n" "$*" > {W}/output/answer.txt'}),
        ("submit", {"from_answer_file": True}),
    ]


def test_a_bare_submit_hands_in_the_line_just_printed_unless_the_answer_file_was_written() -> None:
    parsed = parse_bash_reply("submit", W, last_line="it's 79207")
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("execute_bash", {"command": f"[ -s {W}/output/answer.txt ] || printf '%s\\n' "
                          f"'it'\"'\"'s 79207' > {W}/output/answer.txt"}),
        ("submit", {"from_answer_file": True}),
    ]  # fmt: skip
    # Beside other commands it is still refused: the line would be from before them.
    beside = parse_bash_reply("```bash\nls\nsubmit\n```", W, last_line="79207")
    assert beside.calls[-1].error == SUBMIT_NOT_ALONE


def test_a_command_on_the_fence_line_itself_runs() -> None:
    # The 1.5B model's reply, eight times over, before it did (each got the no-block correction).
    text = '```bash grep "widget-1337" /workspace/input/prices.csv\n```'
    assert commands(text) == [
        ("execute_bash", {"command": 'grep "widget-1337" /workspace/input/prices.csv'})
    ]
    assert str(commands("```Python print(6 * 7)\n```")[0][1]["command"]).endswith(
        "\nprint(6 * 7)\nLLMSANDBOX_PY_END"
    )
    assert commands("```bash\nls\n```") == [("execute_bash", {"command": "ls"})]


def test_a_script_under_a_line_naming_python_runs_with_python3() -> None:
    # The 1.5B model's reply, eight times over (bash ran `python`, not found, then the script).
    text = (
        "```bash\npython\nprint(sum(i for i in range(1, 10001) if i % 3 == 0 or i % 5 == 0))\n```"
    )
    ((_, args),) = commands(text)
    assert args["command"] == (
        "python3 - <<'LLMSANDBOX_PY_END'\n"
        "print(sum(i for i in range(1, 10001) if i % 3 == 0 or i % 5 == 0))\nLLMSANDBOX_PY_END"
    )
    assert commands("```bash\npython3\n```") == [("execute_bash", {"command": "python3"})]


def test_python_or_pip_not_found_gets_the_python3_hint() -> None:
    output = (
        "[exit code 127]\n[stderr]\n/dev/shm/execd-b5/command.sh: line 1: python: command not found"
    )
    assert hint('python -c "print(1)"', output) == NO_BARE_PYTHON
    assert hint("pip install x", output.replace("python:", "pip:")) == NO_BARE_PYTHON


def test_a_command_that_is_not_found_gets_a_hint_naming_it() -> None:
    # The 1.5B model called a shell function it never defined, seven times.
    output = (
        "[exit code 0]\n2\n[stderr]\n/dev/shm/execd-07583828e99e023d/command.sh: line 1: "
        "is_prime: command not found"
    )
    command = "for i in {2..1000}; do if ! is_prime $i; then echo $i; break; fi; done"
    assert hint(command, output) == NOT_A_COMMAND.format(name="is_prime")
    assert hint("ls", "[exit code 0]\nfile.txt") is None


def test_python_c_with_a_statement_after_a_semicolon_gets_the_python_block_hint() -> None:
    # The 1.5B model's reply, resent unchanged seven times before this hint existed.
    command = (
        "python3 -c \"import csv; with open('/workspace/input/prices.csv', 'r') as f: "
        "reader = csv.reader(f); for row in reader: if row[0] == 'widget-1337': print(row[1])\""
    )
    error = '[exit code 1]\n[stderr]\n  File "<string>", line 1\nSyntaxError: invalid syntax'
    assert hint(command, error) == PYTHON_C_HINT
    assert hint("python3 solve.py", error) is None
    assert hint(command, "[exit code 1]\n[stderr]\nNameError: name 'x' is not defined") is None


def test_a_python_block_runs_with_python3() -> None:
    ((name, args),) = commands("```python\nprint(2**20)\n```")
    assert name == "execute_bash"
    assert args["command"] == "python3 - <<'LLMSANDBOX_PY_END'\nprint(2**20)\nLLMSANDBOX_PY_END"


def test_output_fences_are_not_code_and_a_reply_without_code_gets_a_correction() -> None:
    # What the small model writes: code to run, then what it imagines the output is.
    text = "```bash\necho 100\n```\nIt prints:\n```\n100\n```"
    assert commands(text) == [("execute_bash", {"command": "echo 100"})]
    assert parse_bash_reply("The answer is 100.", W).correction == NO_BLOCK


# Real replies of Qwen2.5-Coder 1.5B at temperature 0 that dropped the fence.
@pytest.mark.parametrize(
    ("text", "command"),
    [
        ('grep "vault 17" /workspace/input/notes.txt | head -n 1',
         'grep "vault 17" /workspace/input/notes.txt | head -n 1'),
        ('python3 -c "print(sum(int(d) for d in str(2**100)))"\n```',
         'python3 -c "print(sum(int(d) for d in str(2**100)))"'),
        ("I count the lines first.\n$ wc -l /workspace/input/app.log",
         "wc -l /workspace/input/app.log"),
    ],
)  # fmt: skip
def test_commands_written_without_a_fence_still_run(text: str, command: str) -> None:
    assert commands(text) == [("execute_bash", {"command": command})]


def test_a_bare_submit_line_is_a_submit() -> None:
    assert commands("The output shows it.\nsubmit 115") == [
        ("execute_bash", {"command": f'set -- 115; printf "%s\\n" "$*" > {W}/output/answer.txt'}),
        ("submit", {"from_answer_file": True}),
    ]


def test_a_reply_cut_at_its_blocks_closing_fence_is_kept_closed() -> None:
    assert closed("Run it.\n```bash\nls") == "Run it.\n```bash\nls\n```"
    assert closed("```bash\nls\n```") == "```bash\nls\n```"
    assert closed("no block") == "no block"


@pytest.mark.parametrize(
    "text", ["```bash\nls\n```\n```bash\npwd\n```", "```bash\nls\n```\n```python\nprint(1)\n```"]
)
def test_of_several_blocks_only_the_first_runs_and_the_model_is_told(text: str) -> None:
    parsed = parse_bash_reply(text, W)
    assert parsed.correction is None
    assert [(c.name, c.error) for c in parsed.calls] == [
        ("execute_bash", None),
        ("", SEVERAL_BLOCKS.format(n=2)),
    ]
    assert json.loads(parsed.calls[0].arguments) == {"command": "ls"}


def test_a_guess_submitted_in_a_later_block_is_not_run() -> None:
    # The 1.5B model's habit: look, compute, and submit a guess, all in one reply.
    text = "```bash\nls -la\n```\n```bash\npython3 x.py\n```\n```bash\nsubmit 70\n```"
    assert [c.name for c in parse_bash_reply(text, W).calls] == ["execute_bash", ""]


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
        # As an endpoint sends it back: cut before the closing fence (the stop string).
        text("```bash\ncat > solve.py <<'EOF'\nprint(sum(range(101)))\nEOF"),
        text('Now submit it.\n```bash\nsubmit "$(python3 solve.py)"\n```'),
    )
    outcome = run_local(task_doc(model={"toolCallFormat": "bash"}))
    shown = (llm_server.chat_requests[1].json or {})["messages"][2]
    assert shown["content"].endswith("EOF\n```"), shown
    assert outcome.result.exit_reason == "submitted", outcome.result.message
    assert outcome.result.answer == "5050"
    assert (outcome.output_dir / "answer.txt").read_text() == "5050\n"
    first = llm_server.chat_requests[0].json or {}
    assert "tools" not in first
    # The reply ends at the first block's closing fence: no imagined output, no second block.
    assert first["stop"] == ["\n```\n"]


def test_an_empty_answer_is_refused_and_the_model_told_why(
    run_local: Any, llm_server: ScriptedLLMServer
) -> None:
    # What the small model did: copy the prompt's example, for a script it never wrote.
    llm_server.script(
        text('```bash\nsubmit "$(python3 solve.py)"\n```'),
        text("```bash\nsubmit 5050\n```"),
    )
    outcome = run_local(task_doc(model={"toolCallFormat": "bash"}))
    told = llm_server.chat_requests[1].json or {}
    assert str(told["messages"][-1]["content"]).endswith(EMPTY_SUBMIT)
    assert (outcome.result.exit_reason, outcome.result.answer) == ("submitted", "5050")


def test_a_guessed_submit_is_refused_and_the_model_sees_the_output_first(
    run_local: Any, llm_server: ScriptedLLMServer
) -> None:
    # The small model's habit: Python in a bash block, and a made-up answer in the same block.
    llm_server.script(
        text("```bash\nn = 2 ** 100\nprint(sum(int(d) for d in str(n)))\nsubmit 1234567890\n```"),
        text("```python\nprint(sum(int(d) for d in str(2 ** 100)))\n```"),
        text("```bash\nsubmit 115\n```"),
    )
    outcome = run_local(task_doc(model={"toolCallFormat": "bash"}))
    assert (outcome.result.exit_reason, outcome.result.answer) == ("submitted", "115")
    told = str((llm_server.chat_requests[1].json or {})["messages"][-1]["content"])
    assert "syntax error" in told  # the shell's own words about the Python it was given
    assert f"Error: {SUBMIT_NOT_ALONE}\n" in told
    assert told.endswith("\n" + NOT_A_COMMAND.format(name="n"))  # `n = 2 ** 100` in bash
    shown = str((llm_server.chat_requests[2].json or {})["messages"][-1]["content"])
    assert shown == "[exit code 0]\n115"


def test_a_resent_command_with_the_answer_it_printed_before_is_submitted(
    run_local: Any, llm_server: ScriptedLLMServer
) -> None:
    # Qwen2.5-Coder 0.5B at temperature 0: the command and its answer in one block, each time;
    # the first is a guess (refused), the second submits what the first printed.
    llm_server.script(
        text('```bash\npython3 -c "print(48271 * 1103515245)"\nsubmit 48271 * 1103515245\n```'),
        text('```bash\npython3 -c "print(53267784391395)"\nsubmit 53267784391395\n```'),
    )
    outcome = run_local(task_doc(model={"toolCallFormat": "bash"}))
    assert (outcome.result.exit_reason, outcome.result.answer) == ("submitted", "53267784391395")
    told = str((llm_server.chat_requests[1].json or {})["messages"][-1]["content"])
    assert told == f"[exit code 0]\n53267784391395\nError: {SUBMIT_NOT_ALONE}"


def test_a_block_resent_with_the_same_output_gets_told_so() -> None:
    failing = shell("", exit_code=1, stderr="ValueError: invalid literal for int()")
    sandbox = InMemorySandbox(commands={"python3 x.py": failing, "python3 y.py": shell("115\n")})
    model = ScriptedModel(
        reply("```bash\npython3 x.py\n```"),
        reply("```bash\npython3 x.py\n```"),
        reply("```bash\npython3 y.py\n```"),
        reply("```bash\nsubmit 115\n```"),
    )
    sandbox.files["output/answer.txt"] = "115\n"
    run = run_loop(model, sandbox, fmt=ToolCallFormat.BASH)
    shown = [str(r.messages[-1]["content"]) for r in run.model.requests[1:4]]
    assert not shown[0].endswith(REPEATED_BLOCK)
    assert shown[1].endswith("\n" + REPEATED_BLOCK)
    assert not shown[2].endswith(REPEATED_BLOCK)
    assert run.result.answer == "115"


def test_the_loop_adds_the_hint_after_the_failing_python_c_and_not_after_the_next_block() -> None:
    one_line = "python3 -c 'import sys; for a in sys.argv: print(a)'"
    failing = shell("", exit_code=1, stderr="SyntaxError: invalid syntax")
    sandbox = InMemorySandbox(commands={one_line: failing, "python3 y.py": shell("7\n")})
    sandbox.files["output/answer.txt"] = "7\n"
    model = ScriptedModel(
        reply(f"```bash\n{one_line}\n```"),
        reply("```bash\npython3 y.py\n```"),
        reply("```bash\nsubmit 7\n```"),
    )
    run = run_loop(model, sandbox, fmt=ToolCallFormat.BASH)
    shown = [str(r.messages[-1]["content"]) for r in run.model.requests[1:3]]
    assert shown[0] == "[exit code 1]\n[stderr]\nSyntaxError: invalid syntax\n" + PYTHON_C_HINT
    assert shown[1] == "[exit code 0]\n7"


def test_a_bare_submit_after_one_printed_line_submits_that_line_in_a_real_shell(
    run_local: Any, llm_server: ScriptedLLMServer
) -> None:
    # The 1.5B model printed the value, then replied `submit` alone (refused, before).
    llm_server.script(
        text('```bash\npython3 -c "print(pow(7, 777, 10**6))"\n```'),
        text("submit"),
    )
    outcome = run_local(task_doc(model={"toolCallFormat": "bash"}))
    assert (outcome.result.exit_reason, outcome.result.answer) == ("submitted", "979207")


def test_a_bare_submit_keeps_the_answer_file_the_model_wrote(
    run_local: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.script(
        text("```bash\necho 6 > output/answer.txt; echo written\n```"),
        text("```bash\nsubmit\n```"),
    )
    outcome = run_local(task_doc(model={"toolCallFormat": "bash"}))
    assert (outcome.result.exit_reason, outcome.result.answer) == ("submitted", "6")


def test_a_bare_submit_after_several_lines_is_refused_as_empty(
    run_local: Any, llm_server: ScriptedLLMServer
) -> None:
    llm_server.script(
        text("```bash\nprintf '1\\n2\\n'\n```"),
        text("```bash\nsubmit\n```"),
        text("```bash\nsubmit 2\n```"),
    )
    outcome = run_local(task_doc(model={"toolCallFormat": "bash"}))
    told = str((llm_server.chat_requests[2].json or {})["messages"][-1]["content"])
    assert told.endswith(EMPTY_SUBMIT)
    assert outcome.result.answer == "2"
