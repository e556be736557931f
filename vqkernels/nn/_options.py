"""vector-quantize-pytorch keyword options that a vqkernels module accepts only when off."""
from __future__ import annotations


def split_default_only(owner: str, options: dict, default_only: dict,
                       ignored: tuple = ()) -> dict:
    """The options that are neither ``default_only`` nor ``ignored``, for the caller to use.

    An option of ``default_only`` must hold its default; None, False and 0 count as one
    value (off). Anything else raises a ValueError naming the option and ``owner``.
    """
    rest = {}
    for name, value in options.items():
        if name in ignored:
            continue
        if name not in default_only:
            rest[name] = value
            continue
        default = default_only[name]
        if not (value == default or (not default and not value)):
            raise ValueError(f"{name}={value!r} is not supported by vqkernels.{owner} "
                             f"(only {default!r}); use vector-quantize-pytorch for it")
    return rest
