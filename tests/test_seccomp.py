"""The seccomp filter as a program: run by a small classic-BPF interpreter, for both architectures.

The kernel test (test_bwrap_backend) shows the filter refusing calls in a real sandbox on this
machine; these show, for every architecture the package knows, which answer each system call
gets, and that the syscall numbers are the kernel's own (checked against the system headers
where they are installed).
"""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path

import pytest

from sandbox_agent.backends.seccomp import (
    AUDIT_ARCH,
    CLONE,
    CLONE3,
    CLONE_NEWNET,
    CLONE_NEWUSER,
    RET_ALLOW,
    RET_ERRNO,
    RET_KILL_PROCESS,
    SYSCALLS,
    X32_SYSCALL_BIT,
    SeccompUnsupportedError,
    filter_program,
)

EPERM = RET_ERRNO | errno.EPERM
ENOSYS = RET_ERRNO | errno.ENOSYS
# Everyday calls on x86_64 (read, write, openat, mmap, execve, fork's clone flags below).
EVERYDAY = {"x86_64": [0, 1, 257, 9, 59, 231], "aarch64": [63, 64, 56, 222, 221, 94]}
FORK_FLAGS = 0x01200011  # CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD
THREAD_FLAGS = 0x003D0F00  # what glibc's pthread_create passes


def run_filter(program: bytes, arch: int, nr: int, arg0: int = 0) -> int:
    """Evaluate a classic BPF seccomp program on one struct seccomp_data."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    acc = 0
    pc = 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:  # LD W ABS
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == 0x15:  # JEQ K
            pc += jt if acc == k else jf
        elif code == 0x35:  # JGE K
            pc += jt if acc >= k else jf
        elif code == 0x45:  # JSET K
            pc += jt if acc & k else jf
        elif code == 0x06:  # RET K
            return int(k)
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x} at {pc - 1}")


@pytest.mark.parametrize("machine", sorted(AUDIT_ARCH))
def test_every_listed_call_is_refused_with_eperm(machine: str) -> None:
    program = filter_program(machine)
    index = 0 if machine == "x86_64" else 1
    arch = AUDIT_ARCH[machine]
    for name, numbers in SYSCALLS.items():
        nr = numbers[index]
        if nr is not None:
            assert run_filter(program, arch, nr) == EPERM, name


@pytest.mark.parametrize("machine", sorted(AUDIT_ARCH))
def test_everyday_calls_fork_and_threads_are_allowed(machine: str) -> None:
    program = filter_program(machine)
    arch = AUDIT_ARCH[machine]
    for nr in EVERYDAY[machine]:
        assert run_filter(program, arch, nr) == RET_ALLOW, nr
    for flags in (FORK_FLAGS, THREAD_FLAGS):
        assert run_filter(program, arch, CLONE[machine], flags) == RET_ALLOW


@pytest.mark.parametrize("machine", sorted(AUDIT_ARCH))
def test_clone_into_a_new_namespace_is_refused_and_clone3_falls_back(machine: str) -> None:
    program = filter_program(machine)
    arch = AUDIT_ARCH[machine]
    for flag in (CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWUSER | FORK_FLAGS):
        assert run_filter(program, arch, CLONE[machine], flag) == EPERM
    assert run_filter(program, arch, CLONE3) == ENOSYS


def test_another_architectures_calls_kill_and_x32_calls_are_refused() -> None:
    program = filter_program("x86_64")
    i386 = 0x40000003
    assert run_filter(program, i386, 1) == RET_KILL_PROCESS
    assert run_filter(program, AUDIT_ARCH["x86_64"], X32_SYSCALL_BIT | 1) == ENOSYS


def test_an_unknown_architecture_is_refused_by_name() -> None:
    with pytest.raises(SeccompUnsupportedError, match="riscv64"):
        filter_program("riscv64")


HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),
}


@pytest.mark.parametrize("machine", sorted(HEADERS))
def test_the_syscall_numbers_are_the_kernels(machine: str) -> None:
    header = HEADERS[machine]
    if not header.exists():
        pytest.skip(f"{header} is not installed (linux-libc-dev)")
    defined = {
        m[1]: int(m[2])
        for m in re.finditer(r"#define __NR(?:3264)?_(\w+)\s+(\d+)", header.read_text())
    }
    index = 0 if machine == "x86_64" else 1
    table = {**{n: nrs[index] for n, nrs in SYSCALLS.items()}, "clone": CLONE[machine]}
    table["clone3"] = CLONE3
    for name, nr in table.items():
        if nr is not None:
            assert defined.get(name) == nr, name
