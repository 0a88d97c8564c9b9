"""One check for every size a user controls, made before anything is allocated.

Options, config.json values and data files all decide how much memory vaekit asks for: latent
and hidden widths, mixture components, sample counts, grid sides, interpolation steps, image
pixels, the bytes a compressed file promises. Left unchecked, an absurd value ends in an
allocator traceback, an overflow, or minutes of swapping before it. Every such size goes through
`check_bytes` (or a wrapper) with an estimate of the memory it needs, which is compared with
one limit:

    VAEKIT_MEMORY_LIMIT   (bytes, or with a suffix: 512M, 8G) if set;
    else half of this machine's RAM

Half of RAM leaves room for the rest of the process and for the machine's other work; a value
that needs more than that could not finish here anyway. The estimates are lower bounds of what
the allocation will take (the exact tensor sizes), so the check never refuses a job that
would fit, and names the option, the limit and the fix in one line.

Seeds have a hard range: torch seeds its generators with 64-bit integers, and vaekit derives
63-bit seeds, so a seed must lie in 0 .. 2**63 - 1.

Torch-free: config.py and cli.py use it at import time.
"""

from __future__ import annotations

import os

from .errors import ConfigError

MAX_SEED = 2**63 - 1
MIN_SEED = -(2**63)
LIMIT_VARIABLE = "VAEKIT_MEMORY_LIMIT"
_SUFFIXES = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def physical_memory() -> int:
    """Bytes of RAM on this machine (a conservative 4 GiB if the system will not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def parse_size(text: str, what: str, error=ConfigError) -> int:
    """Bytes from "8589934592", "512M", "8G", "1.5GiB" (suffixes K, M, G, T: powers of 1024).

    what: the option and separator the message starts with ("--data-memory ", "VAR=")."""
    cleaned = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = _SUFFIXES.get(cleaned[-1:], 1)
    try:
        value = int(float(cleaned[:-1] if cleaned[-1:] in _SUFFIXES else cleaned) * scale)
    except (ValueError, OverflowError):
        raise error(f"{what}{text!r} is not a size; give bytes or a size such as 512M or 8G") \
            from None
    if value < 0:
        raise error(f"{what}{text!r} is negative; give a size such as 8G")
    return value


def memory_limit() -> int:
    """The most bytes one user-sized allocation may take (see the module doc)."""
    text = os.environ.get(LIMIT_VARIABLE, "").strip()
    if not text:
        return physical_memory() // 2
    value = parse_size(text, f"{LIMIT_VARIABLE}=", ConfigError)
    if value < 1:
        raise ConfigError(f"{LIMIT_VARIABLE} must be positive, got {value}; give a size such as "
                          "8G")
    return value


AUTO_DATA_MEMORY = 2**30  # --data-memory auto holds at most 1 GiB of training data in memory


def data_memory_budget(text: str, error=ConfigError) -> int:
    """Bytes of training data held in process memory (--data-memory); larger data are read from
    their memory-mapped cache file instead. auto: a quarter of RAM and at most AUTO_DATA_MEMORY:
    training from the map runs at the in-memory rate (benchmarks/data_scale.py: 0.95 to 1.17 x),
    while reading data into memory costs seconds per GiB at every start and a copy per process,
    so larger data are mapped; the rest of RAM stays for the model and the page cache."""
    if text.strip().lower() == "auto":
        return min(physical_memory() // 4, AUTO_DATA_MEMORY)
    return parse_size(text, "--data-memory ", error)


def human(nbytes: float) -> str:
    """Bytes in the unit that reads best: 512 B, 3.1 MiB, 7.5 GiB, 9.1e+03 TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB" if nbytes < 1e4 else f"{nbytes:.1e} TiB"


def check_bytes(what: str, nbytes: int, fix: str, error=ConfigError) -> None:
    """Refuse `what` (an option and its value, a file) if it needs more than the memory limit.

    what: e.g. "--latent-dim 1000000000000 (a model of 1.9e+14 parameters)"
    fix: how to get under the limit, e.g. "use a smaller --latent-dim"
    """
    limit = memory_limit()
    if nbytes > limit:
        source = f"{LIMIT_VARIABLE}" if os.environ.get(LIMIT_VARIABLE) else \
            f"half of this machine's RAM; set {LIMIT_VARIABLE} to change it"
        raise error(f"{what} needs about {human(nbytes)}, over vaekit's memory limit of "
                    f"{human(limit)} ({source}); {fix}")


def check_elements(what: str, count: int, bytes_each: int, fix: str, error=ConfigError) -> None:
    """check_bytes for `count` elements of `bytes_each` bytes (4 for float32)."""
    check_bytes(what, int(count) * int(bytes_each), fix, error)


def check_seed(option: str, value: int, error=ConfigError) -> int:
    """A seed torch and vaekit can use: -2**63 .. 2**63 - 1 (negative seeds were always
    accepted, and runs trained with one must keep loading)."""
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_SEED <= value <= MAX_SEED:
        raise error(f"{option} must be a whole number from -2**63 to 2**63 - 1, got {value!r}; "
                    "choose a smaller seed")
    return value


def check_at_most(option: str, value: int, limit: int, why: str, error=ConfigError) -> int:
    """A hard cap that does not depend on memory (classes, steps a picture can show)."""
    if value > limit:
        raise error(f"{option} is {value:,}, over the limit of {limit:,} ({why}); use at most "
                    f"{limit:,}")
    return value
