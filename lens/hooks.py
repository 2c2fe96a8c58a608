"""Hook points: the named places where the forward pass reads from or writes to the residual
stream. A hook point that nobody hooks costs one truthiness check; a hooked one runs its
functions in order, checks what they return, and can watch the gradient flowing back. The API
is TransformerLens's (permanent hooks, context levels, prepend, ctx), on lens models and on any
nn.Module built from HookPoints (HookedRootModule)."""

import contextvars
import difflib
import inspect
import itertools
import re
from contextlib import contextmanager
from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

HookFn = Callable[..., Optional[Tensor]]
NamesFilter = Union[None, str, Iterable[str], Callable[[str], bool]]
_LAYER = re.compile(r"^blocks\.(\d+)\.")
_DIRS = ("fwd", "bwd")
# The absolute positions of the forward pass running in this thread (or task): set for the
# length of a call by the model, so a forward run inside a hook, or in another thread, keeps
# its own.
POSITIONS: contextvars.ContextVar[Optional[Tensor]] = contextvars.ContextVar("positions", default=None)
# Hooks added for one call (hooks(), run_with_hooks, run_with_cache, generate, patching) live
# in the context of the thread (or task) that made the call, not on the model: {hook point:
# (forward handles, backward handles)}. The dict is never edited, only replaced, so a thread or
# an asyncio task that copied the context keeps its own.
_CALL_HOOKS: contextvars.ContextVar[dict] = contextvars.ContextVar("call_hooks", default={})
# {id(model): open hooks() contexts} in this thread or task.
_LEVELS: contextvars.ContextVar[dict] = contextvars.ContextVar("hook_levels", default={})
# Run order: every handle takes the next number (a prepended one the next negative number),
# so a hook point's model-wide and call hooks run in the order they were added, as one list.
_ORDER = itertools.count(1)


def _check_dir(dir: str, both: bool = False) -> None:
    valid = _DIRS + (("both",) if both else ())
    if dir not in valid:
        raise ValueError(f"dir={dir!r}; valid values are {', '.join(map(repr, valid))}")


def hook_entries(entries, arg: str = "fwd_hooks") -> list[tuple[NamesFilter, HookFn]]:
    """(name, fn) pairs from a list of pairs or a dict {name: fn}, with an error that says what
    was given and what is valid."""
    valid = (f"{arg} is a list of (hook name, fn) pairs, e.g. [('blocks.0.hook_resid_pre', fn)] "
             "(a name may also be a list of names or a predicate), or a dict {name: fn}")
    if isinstance(entries, dict):
        entries = list(entries.items())
    if isinstance(entries, tuple) and len(entries) == 2 and callable(entries[1]) \
            and not isinstance(entries[0], tuple):
        raise TypeError(f"{arg} is one pair {_short(entries)}; {valid}: wrap it in a list")
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Iterable):
        raise TypeError(f"{arg}={_short(entries)}; {valid}")
    out = []
    for e in entries:
        if not isinstance(e, (tuple, list)) or len(e) != 2:
            raise TypeError(f"{arg} has the entry {_short(e)}; {valid}")
        name, fn = e
        if not (isinstance(name, str) or callable(name) or (
                isinstance(name, (list, tuple)) and all(isinstance(n, str) for n in name))):
            raise TypeError(f"{arg} has the hook name {_short(name)} ({type(name).__name__}); {valid}")
        if not callable(fn):
            raise TypeError(f"{arg} has a hook function for {name!r} that is not callable: "
                            f"{_short(fn)}; {valid}")
        out.append((name, fn))
    return out


def check_incl_bwd(incl_bwd: bool) -> None:
    """incl_bwd=True needs autograd on (it calls backward on the output)."""
    if incl_bwd and not torch.is_grad_enabled():
        raise RuntimeError("incl_bwd=True caches gradients, but gradients are off here (inside "
                           "torch.no_grad() or torch.inference_mode()); call it outside them")


def _short(x) -> str:
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


class HookHandle:
    """One hook function on one hook point, as added: its direction, whether it is permanent,
    and the hooks() context level that added it (None: added outside any context).
    ``remove()`` takes this entry off, and only it (a second call does nothing), even when the
    same function was added again elsewhere. TransformerLens calls it LensHandle; its
    ``handle.hook.remove()`` and ``handle.user_hook`` work here too."""

    __slots__ = ("fn", "hook_point", "dir", "is_permanent", "context_level", "call", "order")

    def __init__(self, hook_point: "HookPoint", fn: HookFn, dir: str = "fwd",
                 is_permanent: bool = False, context_level: Optional[int] = None,
                 call: bool = False, prepend: bool = False):
        self.fn, self.hook_point, self.dir = fn, hook_point, dir
        self.is_permanent, self.context_level = bool(is_permanent), context_level
        self.call = call  # belongs to one call's thread or task, not to the model
        self.order = -next(_ORDER) if prepend else next(_ORDER)

    @property
    def user_hook(self) -> HookFn:
        return self.fn

    @property
    def hook(self) -> "HookHandle":
        """TransformerLens's handle.hook (its torch handle): this handle, for .remove()."""
        return self

    @property
    def active(self) -> bool:
        """Whether the entry is still on its hook point (for a call's hook: in this thread)."""
        return any(h is self for h in self.hook_point._hooks(self.dir))

    def remove(self) -> None:
        """Take this entry off (a call's hook: in the thread or task that added it)."""
        self.hook_point._drop(lambda h: h is self, self.dir)

    def matches(self, including_permanent: bool, level: Optional[int]) -> bool:
        """In scope of a remove_hooks / has_hooks call (TransformerLens's rule)."""
        if self.is_permanent and not including_permanent:
            return False
        return level is None or self.context_level == level

    def __repr__(self) -> str:
        bits = [self.dir] + (["permanent"] if self.is_permanent else []) + (
            [f"level={self.context_level}"] if self.context_level is not None else [])
        return f"HookHandle({self.hook_point.name!r}, {getattr(self.fn, '__name__', self.fn)!r}, {', '.join(bits)})"


LensHandle = HookHandle


class HookPoint(nn.Module):
    """An identity on the forward pass that hook functions can read or replace.

    A hook function is ``fn(activation, hook) -> Tensor | None``: returning a tensor replaces
    the activation (it must keep the shape, dtype and device), returning None keeps it; it may
    also edit the activation in place (under autograd it then gets a copy, so the backward of
    the op that made it is unharmed; a function with ``fn.reads_only = True`` promises not to
    and gets the activation itself). A backward hook gets the gradient and may return it as a
    1-tuple ``(grad,)`` too. ``hook.name`` is the hook point's
    module path, ``hook.layer()`` its block, ``hook.ctx`` a dict hook functions may keep state
    in (cleared by reset_hooks), ``hook.positions`` the absolute positions that the
    activation's pos axis covers in the current forward pass. ``fwd_hooks`` / ``bwd_hooks`` are
    the HookHandles that run here, in order: the model-wide ones (add_hook) and those of the
    calls running in this thread (hooks(), run_with_hooks, ...), which other threads do not see.
    """

    def __init__(self):
        super().__init__()
        self.name: str = ""
        self._model_hooks: dict[str, list[HookHandle]] = {"fwd": [], "bwd": []}
        self.ctx: dict = {}

    @property
    def active(self) -> bool:
        """Whether any hook runs here in this thread (the forward takes its slower exact path
        for some hook points only then)."""
        m = self._model_hooks
        return bool(m["fwd"]) or bool(m["bwd"]) or self in _CALL_HOOKS.get()

    @property
    def fwd_hooks(self) -> list[HookHandle]:
        return self._hooks("fwd")

    @fwd_hooks.setter
    def fwd_hooks(self, handles) -> None:
        self._set_hooks("fwd", handles)

    @property
    def bwd_hooks(self) -> list[HookHandle]:
        return self._hooks("bwd")

    @bwd_hooks.setter
    def bwd_hooks(self, handles) -> None:
        self._set_hooks("bwd", handles)

    def layer(self) -> Optional[int]:
        m = _LAYER.match(self.name or "")
        return int(m.group(1)) if m else None

    @property
    def positions(self) -> Optional[Tensor]:
        """[batch, pos] absolute positions of the activation's pos axis in the running call."""
        return POSITIONS.get()

    def _hooks(self, dir: str) -> list[HookHandle]:
        """The handles of `dir` that run here in this thread, in run order (a read-only list)."""
        model = self._model_hooks[dir]
        call = _CALL_HOOKS.get().get(self)
        if not call or not call[dir == "bwd"]:
            return _Handles(model)
        return _Handles(sorted(model + list(call[dir == "bwd"]), key=lambda h: h.order))

    def _set_hooks(self, dir: str, handles) -> None:
        handles = list(handles)
        self._drop(lambda h: True, dir)
        self._model_hooks[dir] = [h for h in handles if not h.call]
        _add_call_handles([h for h in handles if h.call])

    def _drop(self, which: Callable[[HookHandle], bool], dir: str) -> None:
        """Remove the handles of `dir` (model-wide and this thread's) for which `which` holds."""
        model = self._model_hooks[dir]
        if any(which(h) for h in model):
            model[:] = [h for h in model if not which(h)]
        call = _CALL_HOOKS.get().get(self)
        if call:
            _drop_call_handles([h for h in call[dir == "bwd"] if which(h)])

    # ------------------------------------------------------------------ TransformerLens's API
    def add_hook(self, hook: HookFn, dir: str = "fwd", is_permanent: bool = False,
                 level: Optional[int] = None, prepend: bool = False) -> HookHandle:
        """Add `hook` (last, or first with prepend=True); it stays until removed."""
        _check_dir(dir)
        if not callable(hook):
            raise TypeError(f"hook function for {self.name!r} is not callable: {hook!r}")
        handle = HookHandle(self, hook, dir, is_permanent, level, prepend=prepend)
        hooks = self._model_hooks[dir]
        hooks.insert(0, handle) if prepend else hooks.append(handle)
        return handle

    def add_perma_hook(self, hook: HookFn, dir: str = "fwd") -> HookHandle:
        return self.add_hook(hook, dir=dir, is_permanent=True)

    def remove_hooks(self, dir: str = "fwd", including_permanent: bool = False,
                     level: Optional[int] = None) -> None:
        """Remove the hooks of `dir` ("fwd", "bwd" or "both"), permanent ones only when asked,
        and only those added at context `level` when it is given."""
        _check_dir(dir, both=True)
        for d in _DIRS if dir == "both" else (dir,):
            self._drop(lambda h: h.matches(including_permanent, level), d)

    def has_hooks(self, dir: str = "both", including_permanent: bool = True,
                  level: Optional[int] = None) -> bool:
        _check_dir(dir, both=True)
        return any(h.matches(including_permanent, level)
                   for d in (_DIRS if dir == "both" else (dir,)) for h in self._hooks(d))

    def clear_context(self) -> None:
        self.ctx = {}

    # ------------------------------------------------------------------ running
    def run(self, x: Tensor) -> Tensor:
        model = self._model_hooks
        call = _CALL_HOOKS.get().get(self)
        if not (call or model["fwd"] or model["bwd"]):
            return x
        fwd, bwd = (self._hooks("fwd"), self._hooks("bwd")) if call else (model["fwd"], model["bwd"])
        if fwd:
            if x.requires_grad and torch.is_grad_enabled() and not all(
                    getattr(h.fn, "reads_only", False) for h in fwd):
                # hooks may edit the activation in place; the op that made it may have saved it
                # for its backward (attention's output, a softmax), so they get a copy
                x = x.clone()
            for h in tuple(fwd):  # a hook may remove itself
                out = _call(h.fn, x, self, "forward hook")
                if out is not None:
                    x = _checked(out, x, self.name, "forward hook")
        if bwd and x.requires_grad:
            for h in tuple(bwd):
                x.register_hook(_GradHook(h.fn, self))
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)

    def extra_repr(self) -> str:
        return f"{self.name!r}, fwd={len(self.fwd_hooks)}, bwd={len(self.bwd_hooks)}"


class _Handles(list):
    """hp.fwd_hooks / hp.bwd_hooks: the handles that run, read-only (a list is built for each
    read, so an edit would change nothing): add hooks with add_hook, take them off with
    handle.remove() or remove_hooks, or assign a new list to hp.fwd_hooks."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("hp.fwd_hooks / bwd_hooks is read-only: use hp.add_hook / handle.remove() / "
                        "hp.remove_hooks, or assign a new list (hp.fwd_hooks = [...])")

    append = extend = insert = remove = pop = clear = sort = reverse = _refuse
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse


def _add_call_handles(handles: list[HookHandle]) -> None:
    """Put call handles on their hook points in this thread's (or task's) table, in one copy."""
    if not handles:
        return
    table = dict(_CALL_HOOKS.get())
    for h in handles:
        fwd, bwd = table.get(h.hook_point, ((), ()))
        table[h.hook_point] = (fwd + (h,), bwd) if h.dir == "fwd" else (fwd, bwd + (h,))
    _CALL_HOOKS.set(table)


def _drop_call_handles(handles: list[HookHandle]) -> None:
    """Take call handles off this thread's table (those still on it), in one copy."""
    table = _CALL_HOOKS.get()
    gone = {id(h) for h in handles}
    points = {h.hook_point for h in handles if h.hook_point in table}
    if not points:
        return
    table = dict(table)
    for hp in points:
        fwd, bwd = (tuple(h for h in hs if id(h) not in gone) for hs in table[hp])
        if fwd or bwd:
            table[hp] = (fwd, bwd)
        else:
            del table[hp]
    _CALL_HOOKS.set(table)


def _call(fn: HookFn, x: Tensor, hook: "HookPoint", what: str):
    """fn(x, hook=hook), with a clear error when fn cannot take those arguments."""
    try:
        return fn(x, hook=hook)
    except TypeError as e:
        try:
            inspect.signature(fn).bind(x, hook=hook)
        except TypeError:
            raise TypeError(f"{what} {getattr(fn, '__name__', fn)!r} on {hook.name!r} cannot be "
                            f"called as fn(activation, hook=hook_point) ({e}); write it as "
                            "def fn(activation, hook): ...") from None
        except ValueError:  # no signature to read (a builtin): the error is the function's own
            pass
        raise


class _GradHook:
    """A tensor hook that calls ``fn(grad, hook)`` and checks what it returns."""

    def __init__(self, fn: HookFn, hook: HookPoint):
        self.fn, self.hook = fn, hook

    def __call__(self, grad: Tensor) -> Optional[Tensor]:
        out = _call(self.fn, grad, self.hook, "backward hook")
        if isinstance(out, tuple) and len(out) == 1:  # (grad,), as torch's module hooks return it
            out = out[0]
        return None if out is None else _checked(out, grad, self.hook.name, "backward hook")


def _checked(out, x: Tensor, name: str, what: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{what} on {name!r} returned {type(out).__name__}; "
                        "return a tensor to replace the activation or None to keep it")
    if out.shape != x.shape:
        raise ValueError(f"{what} on {name!r} returned shape {tuple(out.shape)} but the "
                         f"activation has shape {tuple(x.shape)}; a replacement must keep the shape")
    if out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"{what} on {name!r} returned a {out.dtype} tensor on {out.device} but "
                         f"the activation is {x.dtype} on {x.device}; a replacement must keep the "
                         "dtype and device (use .to(activation))")
    return out


class Hookable:
    """The hooks API, mixed into a module that owns HookPoints (named by their module path)."""

    hook_dict: dict[str, HookPoint]
    is_caching: bool = False

    def setup_hooks(self) -> None:
        self.hook_dict = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    @property
    def mod_dict(self) -> dict[str, nn.Module]:
        """Every named submodule by its path (the hook points included), as TransformerLens."""
        return {name: m for name, m in self.named_modules() if name}

    def hook_points(self):
        return self.hook_dict.values()

    @property
    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    def hook_names_matching(self, names: object) -> list[str]:
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
        if not isinstance(names, Iterable):
            raise TypeError(f"names filter {names!r:.60} ({type(names).__name__}) is not a hook name, "
                            "a list of names or a predicate fn(name) -> bool")
        names = list(names)
        for n in names:
            self._hook_point(n)
        if not names:
            raise ValueError("the names filter is an empty list; give at least one hook name")
        return names

    def _hook_point(self, name: str) -> HookPoint:
        if not isinstance(name, str):
            raise TypeError(f"hook names are strings, got {type(name).__name__}: {name!r}")
        hook_dict = getattr(self, "hook_dict", None) or {}
        try:
            return hook_dict[name]
        except KeyError:
            if not hook_dict:
                raise KeyError(f"unknown hook point {name!r}: this module has no named hook points; "
                               "call self.setup() at the end of __init__, after its HookPoints "
                               "are defined") from None
            why = self.why_absent(name)
            if why:
                raise KeyError(f"{name!r} is not a hook point of this model: {why}") from None
            near = difflib.get_close_matches(name, hook_dict, n=3, cutoff=0.5)
            hint = f"; did you mean {near}?" if near else f"; valid names include {self.hook_names[:6]}"
            raise KeyError(f"unknown hook point {name!r}{hint} (model.hook_names lists all "
                           f"{len(hook_dict)})") from None

    def why_absent(self, name: str) -> Optional[str]:
        """Why a hook point that other architectures have does not exist here (None if unknown)."""
        return None

    def check_hooks_to_add(self, hook_point: HookPoint, hook_point_name: str, hook: HookFn,
                           dir: str = "fwd", is_permanent: bool = False, prepend: bool = False) -> None:
        """Override to refuse some hooks (TransformerLens's extension point); accepts all."""

    # ------------------------------------------------------------------ adding and removing
    def add_hook(self, name: NamesFilter, hook: HookFn, dir: str = "fwd", is_permanent: bool = False,
                 level: Optional[int] = None, prepend: bool = False) -> list[HookHandle]:
        """Add `hook` to every hook point `name` selects (a name, a list, a predicate); it stays
        until removed: by its handles, by reset_hooks() unless permanent, or by
        reset_hooks(including_permanent=True)."""
        return self._add(name, hook, dir, is_permanent, level, prepend)

    def _add(self, name: NamesFilter, hook: HookFn, dir: str = "fwd", is_permanent: bool = False,
             level: Optional[int] = None, prepend: bool = False, call: bool = False) -> list[HookHandle]:
        """add_hook; call=True makes handles for this thread's call that the caller puts on."""
        _check_dir(dir)
        if not callable(hook):
            raise TypeError(f"hook function for {name!r} is not callable: {hook!r}")
        names = self.hook_names_matching(name)
        for n in names:
            self.check_hooks_to_add(self.hook_dict[n], n, hook, dir=dir, is_permanent=is_permanent,
                                    prepend=prepend)
        if call:
            return [HookHandle(self.hook_dict[n], hook, dir, is_permanent, level, call=True,
                               prepend=prepend) for n in names]
        return [self.hook_dict[n].add_hook(hook, dir, is_permanent, level, prepend) for n in names]

    def add_perma_hook(self, name: NamesFilter, hook: HookFn, dir: str = "fwd") -> list[HookHandle]:
        """A hook that reset_hooks() and the end of hooks() contexts leave in place."""
        return self.add_hook(name, hook, dir=dir, is_permanent=True)

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False,
                            level: Optional[int] = None) -> None:
        for hp in self.hook_dict.values():
            hp.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def clear_contexts(self) -> None:
        for hp in self.hook_dict.values():
            hp.clear_context()

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both",
                    including_permanent: bool = False, level: Optional[int] = None) -> None:
        """Remove hook functions (all but the permanent ones, by default) and clear every
        hook point's ctx, as TransformerLens's reset_hooks."""
        if clear_contexts:
            self.clear_contexts()
        self.remove_all_hook_fns(direction, including_permanent, level=level)
        self.is_caching = False

    def list_hooks(self, name_filter: NamesFilter = None, dir: str = "both",
                   including_permanent: bool = True) -> dict[str, list[HookHandle]]:
        """The handles on each hook point that has any, by name."""
        _check_dir(dir, both=True)
        names = self.hook_names if name_filter is None else self.hook_names_matching(name_filter)
        out = {}
        for n in names:
            hp = self.hook_dict[n]
            handles = [h for d in (_DIRS if dir == "both" else (dir,)) for h in hp._hooks(d)
                       if h.matches(including_permanent, None)]
            if handles:
                out[n] = handles
        return out

    # ------------------------------------------------------------------ for one block or call
    @property
    def context_level(self) -> int:
        """How many hooks() contexts are open on this model in this thread (TransformerLens's
        counter)."""
        return _LEVELS.get().get(id(self), 0)

    @context_level.setter
    def context_level(self, level: int) -> None:
        levels = dict(_LEVELS.get())
        if level:
            levels[id(self)] = level
        else:
            levels.pop(id(self), None)
        _LEVELS.set(levels)

    @contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True,
              clear_contexts: bool = False):
        """Hooks that live for the `with` block, removed on exit, also on errors and Ctrl-C.

        Each entry is (name or list of names or predicate, fn); a dict {name: fn} works too.
        The hooks belong to this thread (or asyncio task): a forward pass run by another thread
        on the same model does not see them. Backward hooks attach to the tensors of forward
        passes run inside the block, so a later .backward() on them still reaches the hook
        functions. The exit removes exactly the hooks this block added (not another block's copy
        of the same function, not a permanent hook); reset_hooks_end=False adds them model-wide
        instead and leaves them on (they carry this block's context level); clear_contexts=True
        also clears every hook point's ctx on exit.
        """
        entries = [(d, name, fn) for d, given, arg in (("fwd", fwd_hooks, "fwd_hooks"),
                                                        ("bwd", bwd_hooks, "bwd_hooks"))
                   for name, fn in hook_entries(given, arg)]
        level = self.context_level + 1
        self.context_level = level
        handles: list[HookHandle] = []
        try:
            for d, name, fn in entries:
                handles += self._add(name, fn, d, level=level, call=reset_hooks_end)
            _add_call_handles(handles if reset_hooks_end else [])
            yield self
        finally:
            self.context_level = level - 1
            if reset_hooks_end:
                _drop_call_handles(handles)
                if clear_contexts:
                    self.clear_contexts()

    def run_with_hooks(self, *args, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True,
                       clear_contexts: bool = False, **kwargs):
        """Run forward with hooks added for this call only (reset_hooks_end=False keeps them)."""
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*args, **kwargs)

    # ------------------------------------------------------------------ caching, TL's plain form
    def get_caching_hooks(self, names_filter: NamesFilter = None, incl_bwd: bool = False,
                          device=None, remove_batch_dim: bool = False, cache: Optional[dict] = None,
                          pos_slice=None) -> tuple[dict, list, list]:
        """(cache, fwd_hooks, bwd_hooks): hooks that store each activation (detached, on
        `device`) in the dict `cache` under its name (gradients under name + "_grad"), as
        TransformerLens's; pos_slice indexes the pos axis (-3 for q/k/v/z/result, else -2): an
        int keeps it (length 1), a Slice of an int drops it, as there."""
        from lens.cache import pos_index
        cache = {} if cache is None else cache
        names = self.hook_names_matching(names_filter)
        if isinstance(pos_slice, int) and not isinstance(pos_slice, bool):
            pos_slice = [pos_slice]  # a plain int keeps the axis here, as TransformerLens's
        index = pos_index(pos_slice)
        self.is_caching = True

        def save(x: Tensor, hook: HookPoint, grad: bool = False) -> None:
            x = x.detach()
            x = x if device is None else x.to(device)
            if remove_batch_dim and x.shape[0] == 1:
                x = x[0]
            pos = -3 if hook.name.endswith(("hook_q", "hook_k", "hook_v", "hook_z", "hook_result")) else -2
            if not (isinstance(index, slice) and index == slice(None)) and x.ndim >= -pos:
                idx = index.to(x.device) if isinstance(index, Tensor) else index
                x = x[(Ellipsis, idx) + (slice(None),) * (-pos - 1)]
            cache[hook.name + ("_grad" if grad else "")] = x

        save.reads_only = True  # the activation needs no copy under autograd
        fwd = [(n, save) for n in names]
        bwd = [(n, lambda g, hook: save(g, hook, True)) for n in names] if incl_bwd else []
        return cache, fwd, bwd


class HookedRootModule(Hookable, nn.Module):
    """A user-built nn.Module with HookPoints, as TransformerLens's HookedRootModule: define the
    layers and HookPoints in __init__, call ``self.setup()`` last, and run_with_hooks,
    run_with_cache (a plain dict of activations), hooks(), add_hook, hook_dict and mod_dict
    work on it. A HookPoint runs when it is called: ``x = self.hook_x(x)``."""

    def __init__(self, *args: Any):
        super().__init__()
        self.hook_dict = {}

    def setup(self) -> None:
        """Name every submodule by its path (``module.name``) and collect the hook points."""
        for name, module in self.named_modules():
            if name:
                module.name = name
        self.setup_hooks()

    def run_with_cache(self, *model_args, names_filter: NamesFilter = None, device=None,
                       remove_batch_dim: bool = False, incl_bwd: bool = False,
                       reset_hooks_end: bool = True, clear_contexts: bool = False, pos_slice=None,
                       **model_kwargs) -> tuple[Any, dict[str, Tensor]]:
        """(output, cache): the forward's output and a dict from hook name to activation (every
        hook point when names_filter is None); incl_bwd=True calls backward on the (scalar)
        output and stores gradients as "<name>_grad"."""
        check_incl_bwd(incl_bwd)
        if remove_batch_dim and model_args and isinstance(model_args[0], Tensor) \
                and model_args[0].ndim and model_args[0].shape[0] != 1:
            raise ValueError(f"remove_batch_dim=True needs batch size 1, got {model_args[0].shape[0]}")
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim,
                                                 pos_slice=pos_slice)
        with self.hooks(fwd, bwd, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                if not isinstance(out, Tensor) or out.numel() != 1:
                    raise ValueError("incl_bwd=True calls backward on the output, which must be a "
                                     f"scalar; got {type(out).__name__}"
                                     f"{tuple(out.shape) if isinstance(out, Tensor) else ''}")
                out.backward()
        return out, cache

    def add_caching_hooks(self, names_filter: NamesFilter = None, incl_bwd: bool = False,
                          device=None, remove_batch_dim: bool = False,
                          cache: Optional[dict] = None) -> dict:
        """Add caching hooks that stay (until reset_hooks()); returns the dict they fill."""
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache)
        for d, entries in (("fwd", fwd), ("bwd", bwd)):
            for name, fn in entries:
                self.add_hook(name, fn, d)
        return cache
