"""Hook points: the named places where the forward pass reads from or writes to the residual
stream. A hook point that nobody hooks costs one truthiness check; a hooked one runs its
functions in order, checks what they return, and can watch the gradient flowing back."""

import contextvars
import difflib
import re
from contextlib import contextmanager
from collections.abc import Callable, Iterable
from typing import Optional, Union

import torch
from torch import Tensor, nn

HookFn = Callable[..., Optional[Tensor]]
NamesFilter = Union[None, str, Iterable[str], Callable[[str], bool]]
_LAYER = re.compile(r"^blocks\.(\d+)\.")
# The absolute positions of the forward pass running in this thread (or task): set for the
# length of a call by the model, so a forward run inside a hook, or in another thread, keeps
# its own.
POSITIONS: contextvars.ContextVar[Optional[Tensor]] = contextvars.ContextVar("positions", default=None)


class HookPoint(nn.Module):
    """An identity on the forward pass that hook functions can read or replace.

    A hook function is ``fn(activation, hook) -> Tensor | None``: returning a tensor replaces
    the activation (it must keep the shape), returning None keeps it. ``hook.name`` is the hook
    point's module path, ``hook.layer()`` its block, ``hook.positions`` the absolute positions
    that the activation's pos axis covers in the current forward pass.
    """

    def __init__(self):
        super().__init__()
        self.name: str = ""
        self.fwd_hooks: list[HookFn] = []
        self.bwd_hooks: list[HookFn] = []

    @property
    def active(self) -> bool:
        return bool(self.fwd_hooks) or bool(self.bwd_hooks)

    def layer(self) -> Optional[int]:
        m = _LAYER.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def positions(self) -> Optional[Tensor]:
        """[batch, pos] absolute positions of the activation's pos axis in the running call."""
        return POSITIONS.get()

    def run(self, x: Tensor) -> Tensor:
        for fn in self.fwd_hooks:
            out = fn(x, hook=self)
            if out is not None:
                x = _checked(out, x, self.name, "forward hook")
        if self.bwd_hooks and x.requires_grad:
            for fn in self.bwd_hooks:
                x.register_hook(_GradHook(fn, self))
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)

    def extra_repr(self) -> str:
        return f"{self.name!r}, fwd={len(self.fwd_hooks)}, bwd={len(self.bwd_hooks)}"


class _GradHook:
    """A tensor hook that calls ``fn(grad, hook)`` and checks what it returns."""

    def __init__(self, fn: HookFn, hook: HookPoint):
        self.fn, self.hook = fn, hook

    def __call__(self, grad: Tensor) -> Optional[Tensor]:
        out = self.fn(grad, hook=self.hook)
        return None if out is None else _checked(out, grad, self.hook.name, "backward hook")


def _checked(out, x: Tensor, name: str, what: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{what} on {name!r} returned {type(out).__name__}; "
                        "return a tensor to replace the activation or None to keep it")
    if out.shape != x.shape:
        raise ValueError(f"{what} on {name!r} returned shape {tuple(out.shape)} but the "
                         f"activation has shape {tuple(x.shape)}; a replacement must keep the shape")
    return out


class HookHandle:
    """Removes one hook function from one hook point (idempotent)."""

    def __init__(self, hooks: list, fn: HookFn):
        self._hooks, self._fn = hooks, fn

    def remove(self) -> None:
        for i, f in enumerate(self._hooks):
            if f is self._fn:
                del self._hooks[i]
                return


class Hookable:
    """The hooks API, mixed into a module that owns HookPoints (named by their module path)."""

    hook_dict: dict[str, HookPoint]

    def setup_hooks(self) -> None:
        self.hook_dict = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module
        self._handles: list[HookHandle] = []

    @property
    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    def hook_names_matching(self, names: NamesFilter) -> list[str]:
        """Resolve a name, a list of names or a predicate to hook names (all when None)."""
        if names is None:
            return self.hook_names
        if callable(names):
            found = [n for n in self.hook_dict if names(n)]
            if not found:
                raise ValueError("the names filter matched no hook point; valid names look like "
                                 f"{self.hook_names[:4]} (see model.hook_names)")
            return found
        if isinstance(names, str):
            names = [names]
        names = list(names)
        for n in names:
            self._hook_point(n)
        if not names:
            raise ValueError("the names filter is an empty list; give at least one hook name")
        return names

    def _hook_point(self, name: str) -> HookPoint:
        if not isinstance(name, str):
            raise TypeError(f"hook names are strings, got {type(name).__name__}: {name!r}")
        try:
            return self.hook_dict[name]
        except KeyError:
            why = self.why_absent(name)
            if why:
                raise KeyError(f"{name!r} is not a hook point of this model: {why}") from None
            near = difflib.get_close_matches(name, self.hook_dict, n=3, cutoff=0.5)
            hint = f"; did you mean {near}?" if near else f"; valid names include {self.hook_names[:6]}"
            raise KeyError(f"unknown hook point {name!r}{hint} (model.hook_names lists all "
                           f"{len(self.hook_dict)})") from None

    def why_absent(self, name: str) -> Optional[str]:
        """Why a hook point that other architectures have does not exist here (None if unknown)."""
        return None

    def add_hook(self, name: NamesFilter, fn: HookFn, dir: str = "fwd",
                 prepend: bool = False) -> list[HookHandle]:
        """Add `fn` to every hook point `name` selects; it stays until removed or reset_hooks()."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir={dir!r}; valid values are 'fwd' and 'bwd'")
        if not callable(fn):
            raise TypeError(f"hook function for {name!r} is not callable: {fn!r}")
        handles = []
        for n in self.hook_names_matching(name):
            hp = self.hook_dict[n]
            hooks = hp.fwd_hooks if dir == "fwd" else hp.bwd_hooks
            hooks.insert(0, fn) if prepend else hooks.append(fn)
            handles.append(HookHandle(hooks, fn))
        self._handles.extend(handles)
        return handles

    def reset_hooks(self) -> None:
        """Remove every hook function from every hook point."""
        for hp in self.hook_dict.values():
            hp.fwd_hooks.clear()
            hp.bwd_hooks.clear()
        self._handles.clear()

    @contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=()):
        """Hooks that live for the `with` block, removed on exit, also on errors and Ctrl-C.

        Each entry is (name or list of names or predicate, fn). Backward hooks attach to the
        tensors of forward passes run inside the block, so a later .backward() on them still
        reaches the hook functions.
        """
        handles: list[HookHandle] = []
        try:
            for name, fn in fwd_hooks:
                handles += self.add_hook(name, fn, "fwd")
            for name, fn in bwd_hooks:
                handles += self.add_hook(name, fn, "bwd")
            yield self
        finally:
            for h in handles:
                h.remove()
            self._handles = [h for h in self._handles if h not in handles]

    def run_with_hooks(self, *args, fwd_hooks=(), bwd_hooks=(), **kwargs):
        """Run forward with hooks added for this call only."""
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
            return self(*args, **kwargs)
