#!/usr/bin/env python3
"""Atomic read-modify-write instructions executed per request, from a callgrind profile.

    python3 bench/atomics.py CALLGRIND_FILE BINARY REQUESTS [--top N] [--sources]

Callgrind counts every instruction as one, but a `lock`-prefixed instruction (or an `xchg` with
memory, locked implicitly) drains the store buffer and costs ~15-25 cycles: on this box, the
samples of `perf record` pile up right after them. nginx's event loop executes almost none per
request; an async Rust stack executes one per reference count touched, mutex taken or waker
moved. This script sums the execution counts callgrind recorded (with `--dump-instr=yes`) at
the addresses where `objdump -d BINARY` shows such an instruction, and prints them per
request, grouped by function (`--sources`: by inlined source location, via addr2line).
Only BINARY's own code is counted (libc's atomics are not; there are few on this path).
"""
import argparse
import collections
import re
import subprocess


def locked_instructions(binary):
    """Address -> (function, instruction) of every atomic read-modify-write in `binary`."""
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", binary],
        capture_output=True, text=True, check=True,
    ).stdout
    found, function = {}, None
    for line in listing.splitlines():
        head = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if head:
            function = head.group(2)
            continue
        insn = re.match(r"^\s+([0-9a-f]+):\s+(.*)$", line)
        if insn:
            text = insn.group(2)
            if text.startswith("lock ") or (text.startswith("xchg") and "(" in text):
                found[int(insn.group(1), 16)] = (function, text)
    return found


def executions(callgrind_file, binary_name, wanted):
    """Address -> times executed, for the addresses in `wanted` inside `binary_name`'s object.

    Follows callgrind's format: position columns are absolute (0x...), relative (+n/-n) or
    `*` (same); the cost line after `calls=` is a call's inclusive cost, not the instruction's.
    """
    counts = collections.Counter()
    names, in_binary = {}, False
    last, after_call = 0, False
    for line in open(callgrind_file):
        if line.startswith("ob="):
            spec = re.match(r"ob=\((\d+)\)(?: (.*))?", line.strip())
            if spec and spec.group(2):
                names[spec.group(1)] = spec.group(2)
            name = names.get(spec.group(1), "") if spec else line[3:]
            in_binary = name.endswith("/" + binary_name) or name == binary_name
            continue
        if line.startswith("calls="):
            after_call = True
            continue
        if not line or line[0] not in "+-*0":
            continue
        fields = line.split()
        position = fields[0]
        if position == "*":
            address = last
        elif position[0] in "+-":
            address = last + int(position, 0)
        else:
            address = int(position, 16)
        last = address
        if after_call:
            after_call = False
            continue
        if in_binary and address in wanted and len(fields) >= 3:
            counts[address] += int(fields[2])
    return counts


def sources_of(binary, addresses):
    """Address -> its inlined call chain, innermost first, outside the standard library where
    possible (one addr2line run for all)."""
    listing = subprocess.run(
        ["addr2line", "-a", "-i", "-C", "-e", binary] + [hex(a) for a in addresses],
        capture_output=True, text=True,
    ).stdout
    chains, frames = {}, None
    for line in listing.splitlines():
        if re.match(r"^0x[0-9a-f]+$", line):
            frames = chains.setdefault(int(line, 16), [])
        elif frames is not None:
            frames.append(re.sub(r"^.*/(registry/src/[^/]+/|rustc/[0-9a-f]+/)", "", line))
    shown = {}
    for address, frames in chains.items():
        outside_std = [frame for frame in frames if not frame.startswith("library/")]
        shown[address] = " <- ".join(outside_std[:3] or frames[:1])
    return shown


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("callgrind_file")
    parser.add_argument("binary")
    parser.add_argument("requests", type=int)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--sources", action="store_true", help="group by source line instead")
    args = parser.parse_args()

    wanted = locked_instructions(args.binary)
    counts = executions(args.callgrind_file, args.binary.rsplit("/", 1)[-1], wanted)
    per_request = lambda n: n / args.requests
    print(f"atomic read-modify-writes per request: {per_request(sum(counts.values())):.1f}")
    sources = sources_of(args.binary, list(counts)) if args.sources else {}
    groups = collections.Counter()
    for address, n in counts.items():
        groups[sources.get(address) or wanted[address][0]] += n
    for key, n in groups.most_common(args.top):
        if per_request(n) >= 0.05:
            print(f"{per_request(n):7.2f}  {key[:170]}")


if __name__ == "__main__":
    main()
