"""Progress bars on stderr: a thin wrapper over tqdm.

A bar shows only when it is wanted (``enabled``, i.e. no ``--quiet``), when its stream is a terminal
(tqdm's ``disable=None``: nothing reaches a log file or a pipe) and when the code is not being traced by
``torch.compile`` (then no tqdm object is made at all, so a compiled sampler loop stays one graph).
"""

from __future__ import annotations

import torch
from tqdm import tqdm


class Progress:
    """``Progress(total, desc)``; ``update(n, postfix)`` advances the bar and sets the text after it;
    ``close()`` ends it. ``initial``: steps already done (a resumed run)."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, initial: int = 0, file=None):
        shown = enabled and not torch.compiler.is_compiling()
        self.bar = tqdm(total=int(total), desc=desc, initial=int(initial), file=file, disable=None,
                        dynamic_ncols=True) if shown else None

    def update(self, n: int = 1, postfix: str = "") -> None:
        """Advance by ``n`` steps; a non-empty ``postfix`` replaces the text after the bar."""
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        """End the bar (its last state stays on the terminal)."""
        if self.bar is not None:
            self.bar.close()
