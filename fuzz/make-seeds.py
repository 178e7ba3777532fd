#!/usr/bin/env python3
"""Writes the hand-made seed inputs in fuzz/seeds/ (the rest of each corpus
is grown by libFuzzer). A seed is the byte form `arbitrary` decodes the
target's Input from (fields in order, little-endian), followed by the bulk
bytes the target takes raw: the kernel file, or Guest memory. Run from anywhere: python3 fuzz/make-seeds.py"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def elf(segments, entry):
    """An ELF64 x86-64 ET_EXEC with one PT_LOAD per (paddr, data, memsz)."""
    phoff, phentsize = 64, 56
    data_at = phoff + phentsize * len(segments)
    head = bytearray(64)
    head[0:4] = b"\x7fELF"
    head[4], head[5], head[6] = 2, 1, 1
    struct.pack_into("<HHIQQ", head, 16, 2, 62, 1, entry, phoff)
    struct.pack_into("<HH", head, 54, phentsize, len(segments))
    phs, body = b"", b""
    for paddr, data, memsz in segments:
        off = data_at + len(body)
        phs += struct.pack("<IIQQQQQQ", 1, 5, off, paddr, paddr, len(data), memsz, 0x1000)
        body += data
    return bytes(head) + phs + body


def elf_input(initrd, cmdline_len, device_model, image):
    opt = b"\x00" if initrd is None else b"\x01" + struct.pack("<H", initrd)
    return opt + struct.pack("<HQ", cmdline_len, device_model) + image


write("elf", "one-segment", elf_input(None, 12, 2, elf([(0x4000, b"\x90" * 16, 0x2000)], 0x4000)))
write(
    "elf",
    "two-segments-initrd",
    elf_input(
        0x3000,
        40,
        2,
        elf([(0x2000, b"\xcc" * 32, 0x1000), (0x8000, b"\x90" * 8, 0x3000)], 0x2000),
    ),
)
