"""The seccomp filter of local sandboxes: a classic BPF program built here, for bwrap's --seccomp.

It refuses (EPERM) the system calls that model-written code has no business making and that
widen the kernel's attack surface or reach other processes: new namespaces (unshare, setns,
clone with a CLONE_NEW* flag), mounts, keyrings, BPF, perf events, userfaultfd, io_uring,
ptrace and cross-process memory access, pidfd_getfd, kexec and kernel modules, plus a few
classic escape and host-wide calls. clone3 gets ENOSYS, as Docker's default profile does: its
flags sit in memory a filter cannot read, and libc then falls back to clone, which is checked.
A system call of another architecture (32-bit int 0x80 on x86_64) kills the process; x32 calls
get ENOSYS. Everything else is allowed: this is a deny list on top of the namespaces and
dropped capabilities, not a whitelist.

Built without libseccomp so that it needs nothing installed; the syscall numbers are the
kernel's own (arch/x86/entry/syscalls, include/uapi/asm-generic/unistd.h), and a test checks
them against the system headers where they exist.
"""

from __future__ import annotations

import errno
import platform
import struct

# Classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
# Offsets in struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6];}; args[0]'s low word
# on little-endian machines (both supported ones).
_NR = 0
_ARCH = 4
_ARG0_LOW = 16

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000

# clone flags that create namespaces (linux/sched.h); all in the low 32 bits.
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACE_FLAGS = (
    CLONE_NEWTIME
    | CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
)

# name: (x86_64, aarch64); None where the architecture has no such call.
SYSCALLS: dict[str, tuple[int | None, int | None]] = {
    # namespaces and mounts
    "unshare": (272, 97),
    "setns": (308, 268),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    # kernel attack surface
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    # other processes
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "pidfd_getfd": (438, 438),
    # the kernel itself and the host
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "open_by_handle_at": (304, 265),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "reboot": (169, 142),
    "acct": (163, 89),
    "quotactl": (179, 60),
    "lookup_dcookie": (212, 18),
    "nfsservctl": (180, 42),
    "syslog": (103, 116),
    "iopl": (172, None),
    "ioperm": (173, None),
    "uselib": (134, None),
}
DENIED = tuple(SYSCALLS)
CLONE = {"x86_64": 56, "aarch64": 220}
CLONE3 = 435


class SeccompUnsupportedError(RuntimeError):
    """No filter is known for this machine's architecture."""


def machine() -> str:
    return platform.machine()


def supported(arch: str | None = None) -> bool:
    return (arch or machine()) in AUDIT_ARCH


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> tuple[int, int, int, int]:
    return code, jt, jf, k


def filter_program(arch: str | None = None) -> bytes:
    """The filter as struct sock_filter[] bytes, as `bwrap --seccomp FD` reads them."""
    arch = arch or machine()
    if arch not in AUDIT_ARCH:
        raise SeccompUnsupportedError(f"no seccomp filter for the {arch} architecture")
    index = 0 if arch == "x86_64" else 1
    denied = sorted({nr for nrs in SYSCALLS.values() if (nr := nrs[index]) is not None})
    # Layout: arch check, load nr, [x32 check], one JEQ per denied call, clone3, clone + flags,
    # then the three returns ALLOW, EPERM, ENOSYS. Jump offsets count from the next instruction.
    head: list[tuple[int, int, int, int]] = [
        _insn(_LD_W_ABS, _ARCH),
        _insn(_JEQ_K, AUDIT_ARCH[arch], jt=1),
        _insn(_RET_K, RET_KILL_PROCESS),
        _insn(_LD_W_ABS, _NR),
    ]
    # Placeholders resolved once the body's length is known: ("eperm" | "enosys" | "allow").
    body: list[tuple[int, int, str, str]] = []
    if arch == "x86_64":
        body.append((_JGE_K, X32_SYSCALL_BIT, "enosys", ""))
    body += [(_JEQ_K, nr, "eperm", "") for nr in denied]
    body.append((_JEQ_K, CLONE3, "enosys", ""))
    body.append((_JEQ_K, CLONE[arch], "", "allow"))
    tail_start = len(head) + len(body) + 2  # + load arg0 + JSET
    targets = {"allow": tail_start, "eperm": tail_start + 1, "enosys": tail_start + 2}
    program = list(head)
    for code, k, jt, jf in body:
        pc = len(program) + 1
        program.append(
            _insn(
                code,
                k,
                jt=targets[jt] - pc if jt else 0,
                jf=targets[jf] - pc if jf else 0,
            )
        )
    program.append(_insn(_LD_W_ABS, _ARG0_LOW))
    pc = len(program) + 1
    program.append(
        _insn(_JSET_K, NAMESPACE_FLAGS, jt=targets["eperm"] - pc, jf=targets["allow"] - pc)
    )
    program += [
        _insn(_RET_K, RET_ALLOW),
        _insn(_RET_K, RET_ERRNO | errno.EPERM),
        _insn(_RET_K, RET_ERRNO | errno.ENOSYS),
    ]
    # Checked whatever python's -O says: a wrong jump would be a filter that lets calls through.
    if len(program) != targets["enosys"] + 1:
        raise SeccompUnsupportedError("the seccomp filter's layout is inconsistent")
    if any(max(insn[1], insn[2]) > 255 for insn in program):
        # Classic BPF jumps are one byte: the deny list must stay under ~250 entries.
        raise SeccompUnsupportedError("the seccomp deny list is too long for one-byte jumps")
    return b"".join(struct.pack("=HBBI", code, jt, jf, k) for code, jt, jf, k in program)
