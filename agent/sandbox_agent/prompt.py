"""The system prompt that teaches the model to work inside the sandbox, and the text-mode tool block."""

from __future__ import annotations

import json
from typing import Any

SYSTEM_PROMPT = """\
You are working inside a sandbox: a small Linux computer of your own with a bash shell, \
Python 3 and a file system. Nothing you do here can harm anyone, so experiment freely. \
Use the computer to solve the task the user gives you, even when the task is not about \
programming.

How to work:
- Explore first. Look around the file system, check which tools and Python packages exist \
(`python3 -c "import numpy"`, `which gcc`), and read what the task gives you.
- Compute, do not guess. For arithmetic, algebra, counting, search, simulation or checking \
a result, write a script to a file and run it. Prefer exact methods (integers, fractions, \
symbolic maths) where they exist, and verify a result a second way when you can.
- Inputs live under {workspace}/input. Long documents are files: search them with grep, \
read the parts that matter with line ranges, or process them with a script. Do not print \
a whole long file into the conversation.
- Install what you need (`pip install --user PACKAGE`) when the network allows it; if it \
does not, use what is installed.
- Never hard-code an answer you have not computed or found.
- {shell_unit} runs in one persistent shell: `cd` and `export` carry over. \
Commands that run longer than {command_timeout} seconds are killed, so start long jobs in \
the background with their output sent to a file (`cmd > log.txt 2>&1 &`). \
A command's output is cut in the middle when it is very long.
- {editing}

{finishing} Files you want to hand back go under {workspace}/output as well.\
"""

# What the prompt says of the shell, of editing and of finishing, with tools.
TOOLS_WORDING = {
    "shell_unit": "Each execute_bash call",
    "editing": "Edit files with str_replace_editor rather than shell echo or heredocs.",
    "finishing": "When you are done, write the final answer (only the answer, in exactly the "
    "format the task asks for) to {workspace}/output/answer.txt, then call submit with the "
    "same answer.",
}
# The bash format's whole prompt: short, because the small models this format is for lose the
# format under the long one (Qwen2.5-Coder 0.5B answered in prose or submitted at once), and
# with no example command or answer, which such a model copies as it stands.
BASH_SYSTEM_PROMPT = """\
You solve tasks on a Linux computer of your own (bash, Python 3, files) by running commands \
on it, even when the task is not about programming.

Every reply: one short sentence on what you do next, then exactly one ```bash code block \
with the commands to run now. You see their output in the next message, and only then \
decide the next block.

- Compute, do not guess: for arithmetic, counting or search, run python3 (a script written \
with a heredoc, or python3 -c). Never write a result you have not seen printed.
- The task's input files are under {workspace}/input. Search long files with grep or a \
script instead of printing them whole.
- Every block runs in the same shell; a command running longer than {command_timeout} \
seconds is killed. Files to hand back go under {workspace}/output.
- When a command's output has shown you the final answer, reply with a block whose only \
line is submit followed by the answer, in exactly the format the task asks for.\
"""

TEXT_TOOLS_PROMPT = """

# Tools

You call tools by writing a tool call in your reply, and you receive each result in the \
next message inside <tool_response></tool_response>. The tools, as JSON schemas:
<tools>
{tools}
</tools>

To call a tool, write exactly this, with a JSON object holding the tool's name and its \
arguments; you may write several calls in one reply:
<tool_call>
{{"name": "execute_bash", "arguments": {{"command": "ls {workspace}/input"}}}}
</tool_call>\
"""

CONTINUE_MESSAGE = (
    "Your reply contained no tool call. Keep working with the tools; when you have the "
    "answer, write it to {workspace}/output/answer.txt and call submit."
)


def system_prompt(
    workspace: str,
    command_timeout: int,
    text_tools: list[dict[str, Any]] | None,
    *,
    bash_blocks: bool = False,
) -> str:
    """The prompt for tools sent natively (no `text_tools`), tools described in the text, or
    (`bash_blocks`) no tools at all: one ```bash block per reply."""
    if bash_blocks:
        return BASH_SYSTEM_PROMPT.format(workspace=workspace, command_timeout=command_timeout)
    filled = {k: v.format(workspace=workspace) for k, v in TOOLS_WORDING.items()}
    text = SYSTEM_PROMPT.format(workspace=workspace, command_timeout=command_timeout, **filled)
    if text_tools is not None:
        block = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in text_tools)
        text += TEXT_TOOLS_PROMPT.format(tools=block, workspace=workspace)
    return text


def continue_message(workspace: str) -> str:
    return CONTINUE_MESSAGE.format(workspace=workspace)


def user_message(prompt: str, workspace: str, input_listing: list[str]) -> str:
    if not input_listing:
        return prompt
    shown = input_listing[:50]
    more = f"\n... and {len(input_listing) - 50} more" if len(input_listing) > 50 else ""
    files = "\n".join(f"- {workspace}/input/{p}" for p in shown)
    return f"{prompt}\n\nInput files:\n{files}{more}"
