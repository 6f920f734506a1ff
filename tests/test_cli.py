"""`sandboxctl` as a user runs it: a real subprocess, a task file, the scripted endpoint."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import backend_param, task_doc
from llmserver import ScriptedLLMServer, slow, tool_call
from sandbox_agent.cli import add_plugin_commands, build_parser, dispatch, main
from sandbox_agent.events import EndpointChosen
from sandbox_agent.local_commands import ProgressPrinter, counted, outputs_line
from sandbox_agent.loop import CANCELLED_CALL
from sandbox_agent.runner import default_run_dir, without_userinfo
from sandbox_agent.taskfile import task_from_prompt
from sandbox_agent.trajectory import Trajectory


def sandboxctl(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sandbox_agent.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def endpoint_env(server: ScriptedLLMServer) -> dict[str, str]:
    return {
        "OPENAI_BASE_URL": server.base_url,
        "OPENAI_API_KEY": "k",
        "OPENAI_MODEL": "scripted-model",
    }


def test_run_prints_progress_and_the_status_block_and_exits_zero(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    llm_server.script(
        tool_call("execute_bash", {"command": "echo 6*7 | bc || python3 -c 'print(6*7)'"}),
        tool_call("submit", {"answer": "42"}),
    )
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task_doc("6 times 7?")))
    proc = sandboxctl(
        "run", "task.yaml", "--backend", "process", "--out", "out", cwd=tmp_path,
        env=endpoint_env(llm_server),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "[step 1/10]" in proc.stderr
    endpoint_line = f"endpoint: {llm_server.base_url}  model: scripted-model\n"
    assert proc.stderr.index(endpoint_line) < proc.stderr.index("[step 1/10]")
    assert "$ echo 6*7" in proc.stderr
    assert "phase:       Succeeded" in proc.stdout
    assert "exitReason:  submitted" in proc.stdout
    assert "answer:      42" in proc.stdout
    assert "trajectory:  out/trajectory.json" in proc.stdout
    assert json.loads((tmp_path / "out" / "result.json").read_text())["answer"] == "42"


def test_flags_override_the_environment_and_the_task(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    llm_server.script(tool_call("submit", {"answer": "x"}))
    (tmp_path / "task.yaml").write_text(
        yaml.safe_dump(task_doc(model={"name": "from-task", "baseURL": "http://127.0.0.1:9/v1"}))
    )
    env = endpoint_env(llm_server) | {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    proc = sandboxctl(
        "run", "task.yaml", "--backend", "process", "--base-url", llm_server.base_url,
        "--model", "from-flag", "--json", "--quiet", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (llm_server.chat_requests[0].json or {})["model"] == "from-flag"
    assert json.loads(proc.stdout)["result"]["phase"] == "Succeeded"
    assert proc.stderr == ""


def test_run_with_a_prompt_needs_no_file(tmp_path: Path, llm_server: ScriptedLLMServer) -> None:
    llm_server.script(tool_call("submit", {"answer": "hello"}))
    proc = sandboxctl(
        "run", "--prompt", "Say hello", "--backend", "process", "--out", "o", cwd=tmp_path,
        env=endpoint_env(llm_server),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    first = llm_server.chat_requests[0].json or {}
    assert first["messages"][1]["content"] == "Say hello"


def test_a_failed_task_exits_one_with_the_reason(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(tool_call("execute_bash", {"command": "true"}))
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task_doc(limits={"maxSteps": 2})))
    proc = sandboxctl(
        "run", "task.yaml", "--backend", "process", "--out", "o", cwd=tmp_path,
        env=endpoint_env(llm_server),
    )  # fmt: skip
    assert proc.returncode == 1
    assert "phase:       Failed" in proc.stdout
    assert "exitReason:  max_steps" in proc.stdout


def test_an_invalid_task_file_exits_two_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "task.yaml").write_text(
        yaml.safe_dump(task_doc(limits={"maxSteps": -1, "commandTimeout": 5}))
    )
    proc = sandboxctl("run", "task.yaml", "--backend", "process", cwd=tmp_path)
    assert proc.returncode == 2
    assert "spec.limits.maxSteps: Input should be greater than or equal to 1" in proc.stderr
    assert "spec.limits.commandTimeout: unknown field" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_input_file_exits_two_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "task.yaml").write_text(
        yaml.safe_dump(task_doc(inputs=[{"path": "d.txt", "file": "missing.txt"}]))
    )
    proc = sandboxctl(
        "run", "task.yaml", "--backend", "process", cwd=tmp_path,
        env={"OPENAI_MODEL": "m"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "spec.inputs[0].file:" in proc.stderr
    assert "missing.txt does not exist" in proc.stderr


def test_validate_checks_that_file_inputs_exist(tmp_path: Path) -> None:
    (tmp_path / "here.txt").write_text("x")
    inputs = [
        {"path": "a.txt", "file": "here.txt"},
        {"path": "b.txt", "file": "gone.txt"},
        {"path": "c.txt", "file": "also-gone.txt"},
    ]
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task_doc(inputs=inputs)))
    proc = sandboxctl("validate", "task.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"sandboxctl validate: task.yaml: spec.inputs[1].file: {tmp_path / 'gone.txt'} does not "
        f"exist; spec.inputs[2].file: {tmp_path / 'also-gone.txt'} does not exist\n"
    )
    (tmp_path / "gone.txt").write_text("y")
    (tmp_path / "also-gone.txt").write_text("z")
    assert sandboxctl("validate", "task.yaml", cwd=tmp_path).returncode == 0


def test_an_endpoint_without_a_model_is_a_clear_error(tmp_path: Path) -> None:
    proc = sandboxctl(
        "run", "--prompt", "hi", "--backend", "process", "--base-url", "http://127.0.0.1:9/v1",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "spec.model.name: no model given" in proc.stderr


def test_task_file_and_prompt_together_are_refused(tmp_path: Path) -> None:
    proc = sandboxctl("run", "t.yaml", "--prompt", "x", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "sandboxctl run: give a task file or --prompt, not both\n"


def test_a_directory_given_as_the_task_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    for command in ("validate", "run"):
        proc = sandboxctl(command, "tasks", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == (
            f"sandboxctl {command}: tasks: is a directory; give the task's YAML file\n"
        )


def test_an_earlier_run_is_never_overwritten_without_overwrite(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    llm_server.set_default(tool_call("submit", {"answer": "first"}))
    args = ("run", "--prompt", "p", "--backend", "process", "--out", "out")
    assert sandboxctl(*args, cwd=tmp_path, env=endpoint_env(llm_server)).returncode == 0
    proc = sandboxctl(*args, cwd=tmp_path, env=endpoint_env(llm_server))
    assert proc.returncode == 2
    assert proc.stderr == (
        "sandboxctl run: --out out: the directory is not empty (an earlier run?); give a new "
        "one, or --overwrite to replace its result, trajectory and outputs\n"
    )
    assert json.loads((tmp_path / "out" / "result.json").read_text())["answer"] == "first"
    llm_server.set_default(tool_call("submit", {"answer": "second"}))
    proc = sandboxctl(*args, "--overwrite", cwd=tmp_path, env=endpoint_env(llm_server))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "result.json").read_text())["answer"] == "second"


def test_an_out_that_is_a_file_or_unwritable_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("mine")
    proc = sandboxctl("run", "--prompt", "p", "--model", "m", "--out", "taken", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "sandboxctl run: --out taken: is a file; give a directory for the run\n"
    assert (tmp_path / "taken").read_text() == "mine"
    proc = sandboxctl("run", "--prompt", "p", "--model", "m", "--out", "/proc/run", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("sandboxctl run: --out /proc/run: cannot write there (")
    assert len(proc.stderr.splitlines()) == 1


def test_the_endpoint_shown_never_carries_a_credential() -> None:
    assert (
        without_userinfo("https://user:s3cret@llm.example:8443/v1") == "https://llm.example:8443/v1"
    )
    assert without_userinfo("http://[::1]:8000/v1") == "http://[::1]:8000/v1"
    assert without_userinfo("http://tok@[::1]/v1") == "http://[::1]/v1"


def test_runs_started_together_get_their_own_directories() -> None:
    task = task_from_prompt("p")
    dirs = {default_run_dir(task, None) for _ in range(50)}
    assert len(dirs) == 50
    assert all(d.parent == Path("sandboxctl-runs") for d in dirs)


def test_an_unexpected_error_is_one_line_unless_debug_asks_for_the_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def broken(args: argparse.Namespace) -> int:
        raise RuntimeError("the disk moved\nsecond line")

    args = argparse.Namespace(command="run")
    assert dispatch(args, {"run": broken}) == 1
    assert capsys.readouterr().err == (
        "sandboxctl run: unexpected error: RuntimeError: the disk moved "
        "(run with --debug for the traceback)\n"
    )
    assert dispatch(args, {"run": broken}, debug=True) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "RuntimeError: the disk moved" in err


def test_debug_is_accepted_before_or_after_the_command(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    for argv in (("--debug", "validate", "tasks"), ("validate", "tasks", "--debug")):
        proc = sandboxctl(*argv, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "is a directory" in proc.stderr


def test_run_without_a_task_names_what_to_give_once(tmp_path: Path) -> None:
    proc = sandboxctl("run", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "sandboxctl run: give a task file, or --prompt TEXT\n"


def test_the_status_block_counts_in_words_and_names_no_missing_folder(tmp_path: Path) -> None:
    assert [counted(n, "call") for n in (0, 1, 2)] == ["0 calls", "1 call", "2 calls"]
    assert counted(1, "retry", "retries") == "1 retry"
    assert counted(3, "retry", "retries") == "3 retries"
    assert outputs_line(tmp_path / "output", 0) == "(none)"
    (tmp_path / "output").mkdir()
    assert outputs_line(tmp_path / "output", 0) == f"{tmp_path / 'output'} (0 files)"
    assert outputs_line(tmp_path / "output", 1) == f"{tmp_path / 'output'} (1 file)"


def test_unknown_backend_is_refused_by_the_parser(tmp_path: Path) -> None:
    proc = sandboxctl("run", "--prompt", "x", "--backend", "vm", cwd=tmp_path)
    assert proc.returncode == 2
    assert "invalid choice: 'vm'" in proc.stderr


def test_validate_prints_the_parsed_spec_with_defaults(tmp_path: Path) -> None:
    examples = Path(__file__).parent.parent / "examples"
    proc = sandboxctl("validate", str(examples / "maths-by-code.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)["spec"]
    assert spec["limits"]["maxSteps"] == 30
    assert spec["sandbox"]["network"]["mode"] == "isolated"


def test_a_kueue_queue_name_is_accepted_and_ignored_by_a_local_run(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    llm_server.script(tool_call("submit", {"answer": "ok"}))
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task_doc("p", queueName="team-a")))
    checked = sandboxctl("validate", "task.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["spec"]["queueName"] == "team-a"
    proc = sandboxctl(
        "run", "task.yaml", "--backend", "process", "--out", "out", cwd=tmp_path,
        env=endpoint_env(llm_server),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        "  note: spec.queueName: for the task's pod on a cluster; sandboxctl run ignores them\n"
        in (proc.stderr)
    )


def test_escape_sequences_from_the_sandbox_are_shown_not_obeyed(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    """A command, its output and the answer carrying OSC 52, screen clearing and a carriage
    return: what reaches the terminal holds no raw control character."""
    llm_server.script(
        tool_call("execute_bash", {"command": "printf 'x\\033]0;owned\\007\\n'  # \x1b[2J"}),
        tool_call("submit", {"answer": "42\x1b]52;c;cHduZWQ=\x07\rfake"}),
    )
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task_doc("6 times 7?")))
    proc = sandboxctl(
        "run", "task.yaml", "--backend", "process", "--out", "out", cwd=tmp_path,
        env=endpoint_env(llm_server),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for stream in (proc.stdout, proc.stderr):
        assert "\x1b" not in stream
        assert "\x07" not in stream
        assert "\r" not in stream
    assert "answer:      42\\x1b]52;c;cHduZWQ=\\x07\\x0dfake" in proc.stdout
    assert "\\x1b[2J" in proc.stderr
    # The files keep the answer exactly as it was given.
    assert json.loads((tmp_path / "out" / "result.json").read_text())["answer"] == (
        "42\x1b]52;c;cHduZWQ=\x07\rfake"
    )


def test_internet_mode_needs_allow_host_network_locally(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    """Locally `internet` is this machine's own network (its loopback, LAN and cloud metadata),
    which a cluster's policy would exclude: refused unless the user accepts it."""
    doc = task_doc("Fetch it.", sandbox={"network": {"mode": "internet"}})
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(doc))
    refused = sandboxctl(
        "run", "task.yaml", "--backend", "process", cwd=tmp_path, env=endpoint_env(llm_server)
    )
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1
    assert "spec.sandbox.network.mode: internet" in refused.stderr
    assert "--allow-host-network" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert llm_server.chat_requests == []
    llm_server.script(tool_call("submit", {"answer": "ok"}))
    allowed = sandboxctl(
        "run", "task.yaml", "--backend", "process", "--allow-host-network", "--out", "out",
        cwd=tmp_path, env=endpoint_env(llm_server),
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("backend", [backend_param("process"), backend_param("bwrap")])
def test_a_run_stopped_by_a_signal_cleans_up_and_records_the_cancel(
    tmp_path: Path, llm_server: ScriptedLLMServer, signum: int, backend: str
) -> None:
    # What `timeout`, CI and process managers send: nothing may be left running or lost.
    marker = f"{31 + signum}.{len(backend)}5"
    llm_server.script(tool_call("execute_bash", {"command": f"sleep {marker}"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(endpoint_env(llm_server))
    # A TMPDIR of its own, that the sandbox's users can reach (tmp_path's parents are 0700).
    scratch = Path(tempfile.mkdtemp(prefix="sigstop-", dir="/tmp"))
    scratch.chmod(0o755)
    env["TMPDIR"] = str(scratch)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox_agent.cli", "run", "--prompt", "p", "--backend",
         backend, "--out", "out"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if f"$ sleep {marker}" in line:
            break
    else:
        pytest.fail("the command never started:\n" + "".join(seen) + proc.communicate()[0])
    time.sleep(0.5)  # the command is running in the sandbox
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err[-3000:]
    name = signal.Signals(signum).name
    assert f"sandboxctl: stopped by {name}; the sandbox was removed" in err
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert (result["phase"], result["exitReason"]) == ("Cancelled", "cancelled")  # as Ctrl-C
    # What was spent and done up to the signal is kept: the call, its tokens, the command.
    assert result["steps"] == 1
    assert result["usage"]["llmCalls"] == 1
    assert result["usage"]["totalTokens"] > 0
    trajectory = json.loads((tmp_path / "out" / "trajectory.json").read_text())
    [call] = trajectory["steps"][0]["tool_calls"]
    assert (call["name"], call["observation"]) == ("execute_bash", CANCELLED_CALL)
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
    assert left.stdout == "", "the sandbox's command outlived the run"
    assert list(scratch.iterdir()) == [], "the sandbox's temporary state outlived the run"
    scratch.rmdir()


def test_every_command_and_option_says_what_it_does() -> None:
    _, sub = build_parser()
    _, missing = add_plugin_commands(sub)
    assert missing == []  # the operator extra is installed for the tests
    assert {"run", "validate", "submit", "get", "wait", "logs", "crd"} <= set(sub.choices)
    helped = {a.dest: a.help for a in sub._choices_actions}
    undocumented = [name for name in sub.choices if not helped.get(name)]
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.help is None and not isinstance(action, argparse._HelpAction):
                undocumented.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert undocumented == []


def test_run_help_lists_the_exit_codes(tmp_path: Path) -> None:
    proc = sandboxctl("run", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    for code in ("0 ", "1 ", "2 ", "129", "130", "143"):
        assert f"\n  {code}" in proc.stdout.split("exit codes:")[1]


def test_a_base_url_that_is_not_a_url_is_one_line_naming_where_it_came_from(
    tmp_path: Path,
) -> None:
    args = ("run", "--prompt", "p", "--model", "m", "--backend", "process")
    proc = sandboxctl(*args, "--base-url", "not a url", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (
        "sandboxctl run: --base-url: 'not a url' is not an http:// or https:// URL "
        "(for example http://127.0.0.1:8000/v1)\n"
    )
    proc = sandboxctl(*args, cwd=tmp_path, env={"OPENAI_BASE_URL": "localhost:8000/v1"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("sandboxctl run: OPENAI_BASE_URL: 'localhost:8000/v1' is not")
    assert not (tmp_path / "sandboxctl-runs").exists()


def test_the_endpoint_line_says_when_no_base_url_was_given() -> None:
    shown = ProgressPrinter.render(
        EndpointChosen("https://api.openai.com/v1", "gpt-4o", default=True)
    )
    assert shown == (
        "endpoint: https://api.openai.com/v1  model: gpt-4o  "
        "(no base URL given: --base-url, OPENAI_BASE_URL or spec.model.baseURL)"
    )
    given = ProgressPrinter.render(EndpointChosen("http://127.0.0.1:8000/v1", "m"))
    assert given == "endpoint: http://127.0.0.1:8000/v1  model: m"


def exec_servers() -> set[int]:
    found = subprocess.run(
        ["pgrep", "-f", "sandbox_agent/execd.py --root"], capture_output=True, text=True
    )
    return {int(pid) for pid in found.stdout.split()}


def test_a_run_killed_outright_leaves_every_finished_step_in_the_journal(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    bash = tool_call("execute_bash", {"command": "echo step"})
    llm_server.script(bash, tool_call("submit", {"answer": "done"}))
    finished = sandboxctl(
        "run", "--prompt", "p", "--backend", "process", "--out", "done",
        cwd=tmp_path, env=endpoint_env(llm_server),
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    assert sorted(p.name for p in (tmp_path / "done").iterdir() if p.is_file()) == [
        "result.json",
        "trajectory.json",
    ]  # the journal goes once trajectory.json is written
    llm_server.script(bash, bash, slow(120, bash))
    servers_before = exec_servers()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(endpoint_env(llm_server))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox_agent.cli", "run", "--prompt", "p", "--backend",
         "process", "--out", "killed"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        waited = 0.0
        while len(llm_server.chat_requests) < 5 and waited < 60:  # 2 above, then the third call
            time.sleep(0.05)
            waited += 0.05
        assert len(llm_server.chat_requests) == 5, "the third call never came"
        started = exec_servers() - servers_before
        assert len(started) == 1
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no say in it: no handler, no clean-up
        proc.wait(timeout=30)
    # The exec server (its own session, out of reach of the kill) sees the host's end of its
    # --parent-fd close, and stops with the commands it started.
    for _ in range(200):
        if not exec_servers() & started:
            break
        time.sleep(0.05)
    assert not exec_servers() & started, "the exec server outlived the run"
    out = tmp_path / "killed"
    assert not (out / "trajectory.json").exists()
    trajectory = Trajectory.from_journal(out / "trajectory.jsonl")
    assert [s.step for s in trajectory.steps] == [1, 2]
    observations = [c.observation for s in trajectory.steps for c in s.tool_calls]
    assert observations == ["[exit code 0]\nstep", "[exit code 0]\nstep"]
    assert trajectory.messages[0]["role"] == "system"


def test_image_is_checked_and_said_to_be_unused_off_docker(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    args = ("run", "--prompt", "p", "--backend", "process", "--out", "out")
    bad = sandboxctl(*args, "--image", "Bad::image", cwd=tmp_path, env=endpoint_env(llm_server))
    assert bad.returncode == 2
    assert bad.stderr.startswith(
        "sandboxctl run: --image: 'Bad::image' is not an image reference: expected "
    )
    assert bad.stderr.count("\n") == 1
    llm_server.script(tool_call("submit", {"answer": "ok"}))
    good = sandboxctl(*args, "--image", "python:3.12", cwd=tmp_path, env=endpoint_env(llm_server))
    assert good.returncode == 0, good.stderr
    assert (
        "  note: --image is for the docker backend; the process backend runs this machine's "
        "own programs (--backend docker to use the image)\n"
    ) in good.stderr


def test_placement_fields_run_locally_and_are_said_to_apply_on_a_cluster_only(
    tmp_path: Path, llm_server: ScriptedLLMServer
) -> None:
    llm_server.script(tool_call("submit", {"answer": "ok"}))
    doc = task_doc(
        "p",
        scheduling={
            "nodeSelector": {"pool": "sandbox"},
            "tolerations": [{"key": "sandbox", "operator": "Exists"}],
        },
    )
    doc["spec"]["sandbox"]["imagePullSecrets"] = [{"name": "regcred"}]
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(doc))
    checked = sandboxctl("validate", "task.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    proc = sandboxctl(
        "run", "task.yaml", "--backend", "process", "--out", "out", cwd=tmp_path,
        env=endpoint_env(llm_server),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        "  note: spec.scheduling.nodeSelector, spec.scheduling.tolerations, "
        "spec.sandbox.imagePullSecrets: for the task's pod on a cluster; sandboxctl run ignores "
        "them\n"
    ) in proc.stderr


def imported_by(*args: str, cwd: Path) -> set[str]:
    """The modules `sandboxctl ARGS` imports (python -X importtime)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sandbox_agent.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


HEAVY = ("openai", "kopf", "aiohttp", "prometheus_client", "sandbox_agent.runner",
         "sandbox_agent.llm", "sandbox_operator.cluster_cli", "sandbox_operator.kube")  # fmt: skip


def test_help_and_validate_import_neither_the_runtime_nor_the_operator(tmp_path: Path) -> None:
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task_doc()))
    for args in (("--help",), ("run", "--help"), ("get", "--help"), ("validate", "task.yaml")):
        modules = imported_by(*args, cwd=tmp_path)
        assert "sandbox_agent.display" in modules  # the CLI ran (as __main__)
        loaded = sorted(m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY)
        assert loaded == [], f"sandboxctl {' '.join(args)} imported {loaded}"


def test_the_backend_names_the_parser_offers_are_the_backends() -> None:
    from sandbox_agent.backend_names import BACKEND_NAMES
    from sandbox_agent.backends import BACKENDS

    assert ("auto", *BACKENDS) == BACKEND_NAMES


def test_without_the_operator_extra_the_cluster_commands_are_a_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sandbox_operator import cluster_commands

    monkeypatch.setattr(cluster_commands, "NEEDED", ("aiohttp", "no_such_module_here"))
    _, sub = build_parser()
    commands, missing = add_plugin_commands(sub)
    assert commands == {}
    assert missing == ["cluster: no_such_module_here is not installed"]
    monkeypatch.setattr(sys, "argv", ["sandboxctl", "get"])
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert main() == 2
    assert stderr.getvalue() == (
        "sandboxctl: no command 'get' here; cluster commands (submit, get, wait, logs, crd) "
        "come with the operator: pip install 'llm-sandbox-operator[operator]' "
        "(cluster: no_such_module_here is not installed)\n"
    )
