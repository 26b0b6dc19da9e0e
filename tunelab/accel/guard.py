"""What a speed-up that fails while it runs does, under train.kernels (tunelab.accel.kernels): one policy for
every kernel of tunelab.accel whose failure shows only at run time (Triton compiling for a card it does not
know, say; a C build that fails is caught before the run, by `choose`).

`auto`: the reference twin computes the same numbers from then on, for this model instance, and one warning
names the speed-up and why. `strict`: a TunelabError at the first failure. A Guard belongs to one model
instance (`kernels.apply` makes it): a kernel that failed for one model is still tried for another.
"""

from __future__ import annotations

import warnings

from tunelab.errors import TunelabError


class Guard:
    """One model instance's policy on failing kernels (mode: auto | strict) and the ones that failed so far."""

    def __init__(self, mode: str = "auto"):
        self.mode = mode
        self.failed: dict[str, str] = {}
        """{speed-up: why} for each one that failed and is off for this model (auto)."""

    def run(self, name: str, kernel, reference):
        """kernel(), or reference() once the kernel `name` has failed for this model; the first failure
        warns (auto) or raises (strict). Both callables take no arguments and return the same numbers."""
        if name in self.failed:
            return reference()
        try:
            return kernel()
        except Exception as e:  # noqa: BLE001 - any failure of a kernel: its reference twin computes the same
            why = f"{type(e).__name__}: {e}"
            if self.mode == "strict":
                raise TunelabError(f"train.kernels=strict: tunelab's {name} failed ({why}); use "
                                   "train.kernels=auto to run without it") from e
            self.failed[name] = why
            warnings.warn(f"tunelab's {name} failed ({why}); train.kernels=auto turned it off for this model: "
                          "PyTorch's ops compute the same numbers", stacklevel=3)
            return reference()

    def __repr__(self) -> str:
        return f"Guard({self.mode!r}, failed={self.failed!r})"
