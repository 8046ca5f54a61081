"""Static shapes for the jitted steps: sizes rounded up to buckets, so that compilations are few.

A decode call compiles once per (rows, cache length), a prefill once per (joining sequences, prompt
length), with rows and sequences rounded up to a power of 4 and lengths to a power of 2.
"""

from __future__ import annotations

MIN_PROMPT_BUCKET = 16
MIN_CACHE_LENGTH = 64


def bucket_size(n: int, minimum: int, maximum: int, base: int = 2) -> int:
    """The smallest power of ``base`` >= n (and >= minimum), capped at maximum."""
    size = max(minimum, 1)
    while size < n:
        size *= base
    return min(size, maximum)


def bucket_sizes(minimum: int, maximum: int, base: int = 2) -> list[int]:
    """Every size ``bucket_size`` can return."""
    sizes = [min(max(minimum, 1), maximum)]
    while sizes[-1] < maximum:
        sizes.append(min(sizes[-1] * base, maximum))
    return sizes
