"""The malloc setting of the fine-tune and the advisor (transfer_learning/common/allocator.py), read back from
glibc's own counters in a fresh process: before it, a large block is served by its own mmap; after it, from the
heap, in the process and in the processes it forks (the DataLoader's workers)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from transfer_learning.common.allocator import glibc_version

MMAPPED_BYTES = """
import ctypes, json, os
from transfer_learning.common.allocator import keep_freed_memory


class Mallinfo2(ctypes.Structure):  # glibc's struct mallinfo2 (<malloc.h>)
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2


def mmapped_for_a_large_block() -> int:  # bytes glibc mmaps for one block as large as a batch's activations
    mapped = libc.mallinfo2().hblkhd
    block = bytearray(64 << 20)
    mapped = libc.mallinfo2().hblkhd - mapped
    del block
    return mapped


before = mmapped_for_a_large_block()
kept = keep_freed_memory()
after = mmapped_for_a_large_block()
read, write = os.pipe()
child = os.fork()
if child == 0:
    os.write(write, str(mmapped_for_a_large_block()).encode())
    os._exit(0)
os.close(write)
in_a_fork = int(os.read(read, 64))
os.waitpid(child, 0)
print(json.dumps({"before": before, "kept": kept, "after": after, "in_a_fork": in_a_fork}))
"""


@pytest.mark.skipif(glibc_version() is None, reason="the setting is glibc's; other C libraries keep their defaults")
def test_after_the_setting_a_large_block_comes_from_the_heap_in_the_process_and_its_forks():
    done = subprocess.run([sys.executable, "-c", MMAPPED_BYTES], cwd=REPO, capture_output=True, text=True,
                          check=True)
    found = json.loads(done.stdout)
    assert found["before"] >= 64 << 20, found  # glibc's default: its own mmap
    assert found["kept"] is True and found["after"] == 0 and found["in_a_fork"] == 0, found
