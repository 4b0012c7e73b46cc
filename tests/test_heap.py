"""polyko.heap.release_heap hands a long-lived process's freed heap back to the OS."""

import os

import pytest

from polyko.heap import malloc_trim, release_heap


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(malloc_trim() is None, reason="needs glibc's malloc_trim")
def test_release_heap_returns_freed_glibc_heap():
    # 1 KB objects come from glibc's heap (above pymalloc's 512 B, below the mmap threshold); a small
    # object allocated after them pins the heap's top, so free() alone cannot shrink it
    blocks = [os.urandom(1024) for _ in range(300_000)]   # ~330 MB
    pin = os.urandom(1024)
    before = _rss_mb()
    del blocks
    freed = _rss_mb()
    release_heap()
    after = _rss_mb()
    assert before - freed < 100, "free() returned the heap by itself: this test measures nothing"
    assert freed - after > 200, f"release_heap returned {freed - after:.0f} MB of ~330 MB freed"
    del pin
