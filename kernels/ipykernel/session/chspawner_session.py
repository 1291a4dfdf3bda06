"""A kernel's session, saved and brought back in a new kernel: chspawner's
IPython extension (level 3 of docs/architecture.md's persistence levels).

No process checkpoint: what a user can't do on a compute node (CRIU needs
privileges), this does at the level of the notebook, as ElasticNotebook
(VLDB 2024) showed it can be done:

- **Recording.** Around every cell (IPython's ``pre_run_cell`` and
  ``post_run_cell`` events) the recorder notes which of the user's
  variables the cell made or rebound (their objects' identities before and
  after), which it may have changed in place (read from the cell's code:
  an item or attribute stored, a method called, the value handed to a
  function), and which it read. That costs a dict of ``id()``s and one
  parse of the cell, not a look at the values.
- **Saving** (``snapshot``). Every variable that pickles is written, in one
  cloudpickle stream (so two names for one object stay one object, and an
  instance keeps its notebook class), numpy's and pandas' data out of band
  (pickle protocol 5: written as they are, read back without a copy). The
  rest (a generator, an open file, a socket ...) is rebuilt by re-running
  the cells that made it, and every cell those cells depend on that the
  saved values can't stand in for (``plan``); what no recorded cell made is
  reported with the reason. The random generators' states (``random``'s,
  numpy's global one) go with it.
- **Restoring** (``restore``), in a new kernel of the same image: the
  values loaded, the cells re-run in their order (their output captured),
  the random states put back last, and a report of what came back how.

A snapshot is a directory of the user's own (mode 0700, files 0600, under
``$CHSPAWNER_SNAPSHOTS``); a snapshot that is not the kernel's user's own,
or that anyone else could have written, is never loaded (unpickling runs
code).

The server (chspawner.persist.kernel_state) calls ``snapshot`` and
``restore`` with silent executions, which IPython's recording events do not
see, and reads their one-line JSON reports.
"""
from __future__ import annotations

import ast
import io
import json
import os
import pickle
import secrets
import socket
import stat
import sys
import time
import types

try:
    import cloudpickle
except ImportError:  # pragma: no cover (the provisioner copies one beside this file)
    cloudpickle = None

#: The snapshot format; a reader refuses one it doesn't know.
FORMAT = 1
MANIFEST = "manifest.json"
#: IPython's own names in the user namespace, never the user's variables.
IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython"}
#: Builtins that change none of their arguments.
PURE_BUILTINS = {
    "abs", "all", "any", "ascii", "bin", "bool", "bytes", "callable", "chr", "complex",
    "dict", "dir", "divmod", "enumerate", "filter", "float", "format", "frozenset",
    "hasattr", "hash", "hex", "id", "int", "isinstance", "issubclass", "len", "list",
    "map", "max", "min", "oct", "ord", "pow", "print", "range", "repr", "reversed",
    "round", "set", "slice", "sorted", "str", "sum", "tuple", "type", "zip", "display"}
#: Well-known methods that change nothing of their object (numpy, pandas,
#: the standard containers): a call of one is a read, any other method call
#: may change the object it is called on.
READ_ONLY_METHODS = {
    "all", "any", "apply", "argmax", "argmin", "astype", "copy", "count", "cumsum",
    "describe", "dot", "drop", "dropna", "filter", "fillna", "get", "groupby", "head",
    "index", "info", "isin", "isna", "items", "iterrows", "itertuples", "keys", "loc",
    "max", "mean", "median", "merge", "min", "nunique", "prod", "query", "reshape",
    "round", "sample", "sort_values", "std", "sum", "tail", "to_numpy", "tolist",
    "transpose", "unique", "value_counts", "values", "var", "format", "join", "split",
    "strip", "startswith", "endswith", "lower", "upper", "replace", "encode", "decode"}
#: Values nothing can change in place.
IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), tuple, frozenset, range,
             types.ModuleType)


# ------------------------------------------------------------ recording --

class CellRecord:
    """One executed cell: its code, what it read and what it (may have) written."""

    __slots__ = ("n", "code", "reads", "writes", "seconds", "ok")

    def __init__(self, n: int, code: str, reads: set, writes: set, seconds: float, ok: bool):
        self.n, self.code, self.reads, self.writes = n, code, reads, writes
        self.seconds, self.ok = seconds, ok

    def to_json(self) -> dict:
        return {"n": self.n, "code": self.code, "reads": sorted(self.reads),
                "writes": sorted(self.writes), "seconds": round(self.seconds, 6),
                "ok": self.ok}

    @classmethod
    def from_json(cls, d: dict) -> "CellRecord":
        return cls(d["n"], d["code"], set(d["reads"]), set(d["writes"]), d["seconds"], d["ok"])


def user_variables(shell) -> dict:
    """The user's variables: the namespace less IPython's own names, the
    names it hides (still bound to what it put there) and ``_`` names."""
    hidden, ns = shell.user_ns_hidden, shell.user_ns
    return {name: value for name, value in ns.items() if is_users(name, value, hidden)}


def is_users(name: str, value, hidden: dict) -> bool:
    """Whether a name in the namespace is one of the user's variables."""
    return not name.startswith("_") and name not in IPYTHON_NAMES \
        and not (name in hidden and hidden[name] is value)


class CellNames(ast.NodeVisitor):
    """The names a cell's code reads, and those it may change in place."""

    def __init__(self):
        self.loaded: set[str] = set()
        self.changed: set[str] = set()
        self.called: list[tuple[ast.expr, list[ast.expr]]] = []  # (function, arguments)
        self._deferred = 0  # inside a def, lambda or generator: runs later, if ever

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.loaded.add(node.id)

    def _deferring(self, node: ast.AST) -> None:
        self._deferred += 1
        self.generic_visit(node)
        self._deferred -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _deferring
    visit_GeneratorExp = visit_ClassDef = _deferring

    def _store(self, target: ast.expr) -> None:
        if isinstance(target, (ast.Attribute, ast.Subscript)):
            root = _root(target)
            if root:
                self.changed.add(root)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                self._store(element)
        elif isinstance(target, ast.Starred):
            self._store(target.value)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            self._store(target)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._store(node.target)
        if isinstance(node.target, ast.Name):
            self.changed.add(node.target.id)  # (in place, for a list or an array)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._store(node.target)
        self.generic_visit(node)

    def visit_Delete(self, node: ast.Delete) -> None:
        for target in node.targets:
            self._store(target)
        self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:
        self._store(node.target)
        if not self._deferred:  # iterating consumes an iterator
            root = _root(node.iter)
            if root:
                self.changed.add(root)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if not self._deferred:
            arguments = [*node.args, *(k.value for k in node.keywords)]
            self.called.append((node.func, arguments))
            in_place = any(k.arg == "inplace" for k in node.keywords)
            if isinstance(node.func, ast.Attribute) and (
                    in_place or node.func.attr not in READ_ONLY_METHODS):
                root = _root(node.func.value)
                if root:
                    self.changed.add(root)
        self.generic_visit(node)


def _root(node: ast.expr) -> str | None:
    """The variable an expression like ``a.b[1].c`` starts from (``a``)."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def changes_nothing(fn: ast.FunctionDef | ast.AsyncFunctionDef, pure: set[str]) -> bool:
    """Whether a function, by its code, only reads what it is given and
    what it sees: no ``global`` or ``nonlocal``, no store into an attribute
    or an item, no method call that may change an object, no argument
    passed to a call that may change it (``pure``: the functions known not
    to), except on names the function binds itself and are not its
    parameters. A call of such a function reads its arguments only, so a
    notebook of cells like ``m = scale(frame['x'])`` doesn't count
    ``frame`` as changed by each."""
    if any(isinstance(node, (ast.Global, ast.Nonlocal)) for node in ast.walk(fn)):
        return False
    names = CellNames()
    for statement in fn.body:
        names.visit(statement)
    changed = set(names.changed)
    for function, arguments in names.called:
        if not (isinstance(function, ast.Name) and function.id in pure):
            changed.update(filter(None, map(_root, arguments)))
    arguments = fn.args
    parameters = {a.arg for a in [*arguments.posonlyargs, *arguments.args,
                                  *arguments.kwonlyargs, arguments.vararg, arguments.kwarg]
                  if a is not None}
    own = {node.id for node in ast.walk(fn)
           if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)} - parameters
    return changed <= own


def _function_globals(fn, ns: dict, depth: int = 2) -> set[str]:
    """The user's variables a notebook function uses (it may change them
    when called), through the notebook functions it calls, ``depth`` deep."""
    names: set[str] = set()
    todo = [(getattr(fn, "__code__", None), depth)]
    while todo:
        code, left = todo.pop()
        if code is None:
            continue
        for name in code.co_names:
            if name in ns:
                names.add(name)
                inner = ns[name]
                if left and isinstance(inner, types.FunctionType) and inner is not fn:
                    todo.append((inner.__code__, left - 1))
        todo.extend((c, left) for c in code.co_consts if isinstance(c, types.CodeType))
    return names


class Recorder:
    """Records, cell by cell, which variables each cell read and (may have) written."""

    def __init__(self, shell):
        self.shell = shell
        self.cells: list[CellRecord] = []
        #: variables there before recording began: no recorded cell made them
        self.unrecorded: set[str] = set(user_variables(shell))
        self._before: dict[str, int] | None = None
        self._started = 0.0
        #: notebook functions that change nothing (changes_nothing): name ->
        #: the id of the function the cell that defined it made
        self._pure: dict[str, int] = {}
        #: the cell's code as IPython parsed it (not parsed twice)
        self.catcher = _TreeCatcher()

    # The hot path (every cell, with the whole namespace): the ids of
    # everything, the filter only on what a cell bound or touched.

    def before(self, info=None) -> None:
        self.catcher.tree = None
        self._before = _ids(self.shell.user_ns)
        self._started = time.perf_counter()

    def after(self, result) -> None:
        seconds = time.perf_counter() - self._started
        before, self._before = self._before, None
        if before is None:  # (loaded in the middle of a cell)
            return
        info = getattr(result, "info", None)
        code = getattr(info, "raw_cell", None) or ""
        ns, hidden = self.shell.user_ns, self.shell.user_ns_hidden
        bound = {name for name, _ in _ids(ns).items() - before.items()
                 if is_users(name, ns[name], hidden)}
        bound |= {name for name in before.keys() - ns.keys()  # deleted
                  if not name.startswith("_") and name not in IPYTHON_NAMES}
        existed = _UsersBefore(before, ns, hidden)
        tree, self.catcher.tree = self.catcher.tree, None
        reads, changed = self._read_and_changed(code, existed, ns, tree)
        n = getattr(result, "execution_count", None) or len(self.cells) + 1
        self.cells.append(CellRecord(n, code, reads, bound | changed,
                                     seconds, bool(getattr(result, "success", True))))

    def _read_and_changed(self, code: str, existed, ns: dict,
                          tree: ast.Module | None = None) -> tuple[set, set]:
        """From the cell's code (``tree``: as IPython parsed it): the earlier
        variables it read, and those it may have changed in place (values
        that can change, only)."""
        try:
            if tree is None:
                tree = ast.parse(self.shell.transform_cell(code))
        except (SyntaxError, ValueError, TypeError):
            # Code we can't read: everything it could see may have changed.
            everything = set(existed)
            return everything, {n for n in everything if not isinstance(ns.get(n), IMMUTABLE)}
        names = CellNames()
        names.visit(tree)
        reads, changed = {n for n in names.loaded if n in existed}, set(names.changed)
        for function, arguments in names.called:
            pure = isinstance(function, ast.Name) and (
                (function.id in PURE_BUILTINS and function.id not in ns)
                or self._pure.get(function.id, -1) == id(ns.get(function.id)))
            if not pure:
                changed.update(filter(None, map(_root, arguments)))
            root = _root(function)
            callee = ns.get(root) if root else None
            if isinstance(function, ast.Name) and isinstance(callee, types.FunctionType):
                used = _function_globals(callee, ns)
                reads |= {n for n in used if n in existed}
                if not pure:
                    changed |= used
        self._learn_functions(tree, ns)
        changed = {n for n in changed
                   if n in existed and n in ns and not isinstance(ns[n], IMMUTABLE)}
        return reads, changed


    def _learn_functions(self, tree: ast.Module, ns: dict) -> None:
        """The functions the cell defined: which change nothing."""
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                known = PURE_BUILTINS | self._pure.keys() | {node.name}
                if changes_nothing(node, known) and isinstance(ns.get(node.name),
                                                               types.FunctionType):
                    self._pure[node.name] = id(ns[node.name])
                else:
                    self._pure.pop(node.name, None)


class _TreeCatcher(ast.NodeTransformer):
    """An IPython AST transformer that changes nothing: it keeps the tree
    of the cell being run, for the recorder to read after it ran."""

    tree: ast.Module | None = None

    def visit(self, node):
        if isinstance(node, ast.Module):
            self.tree = node
        return node


def _ids(ns: dict) -> dict[str, int]:
    """{name: id(value)}, built in C (this runs twice per cell on the
    whole namespace)."""
    return dict(zip(ns.keys(), map(id, ns.values())))


class _UsersBefore:
    """The user's variables before a cell, as ``in`` and iteration see
    them, from the ids of the whole namespace then: each name filtered
    when asked, not all of them every cell."""

    def __init__(self, before: dict[str, int], ns: dict, hidden: dict):
        self.before, self.ns, self.hidden = before, ns, hidden

    def __contains__(self, name: str) -> bool:
        if name not in self.before or name.startswith("_") or name in IPYTHON_NAMES:
            return False
        # (hidden: IPython's own value, still bound then as now)
        return not (name in self.hidden and id(self.hidden[name]) == self.before[name])

    def __iter__(self):
        return (name for name in self.before if name in self)


# --------------------------------------------------------------- planning --

def plan(cells: list[CellRecord], names: set[str], unsaved: set[str],
         unrecorded: set[str] = frozenset()) -> tuple[list[int], set[str], dict[str, str]]:
    """What to re-run so that the variables in ``unsaved`` (of the session's
    ``names``) come back: (the indices of ``cells`` to re-run, in order;
    every variable those re-runs make again, which must then not be loaded;
    {variable: why it can't come back}).

    A cell re-run writes again everything it wrote, so each of those
    variables is made again from its whole history; and a cell re-run must
    see what it read as it was then, so a variable it read that a later
    cell changed is made again too. Until nothing more is needed.
    """
    writers: dict[str, list[int]] = {}
    for i, cell in enumerate(cells):
        for name in cell.writes:
            writers.setdefault(name, []).append(i)
    again, rerun, lost = set(unsaved), set(), {}
    queue = list(again)
    while queue:
        name = queue.pop()
        made_by = writers.get(name, [])
        if not made_by:
            if name in names:
                lost[name] = ("it was made before chspawner began recording"
                              if name in unrecorded else "no recorded cell made it")
            continue
        for i in made_by:
            if i in rerun:
                continue
            rerun.add(i)
            cell = cells[i]
            needed = set(cell.writes)
            needed |= {r for r in cell.reads if any(j > i for j in writers.get(r, []))}
            needed |= {r for r in cell.reads if r not in names}  # deleted since
            for other in needed - again:
                again.add(other)
                queue.append(other)
    return sorted(rerun), again & names, lost


# ---------------------------------------------------------- serializing --

class _Sink:
    """A file that only counts what is written to it (a trial's size)."""

    def __init__(self):
        self.size = 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.size += n
        return n


class _UserNamespace:
    """The persistent id of the user namespace: notebook functions pickled
    by value keep it as their globals, so in the new kernel they see (and
    change) the new kernel's variables, as they did the old one's."""

    ID = "chspawner:user_ns"


def _pickler(file, shell, buffers: list):
    """A cloudpickle pickler (protocol 5, numpy and pandas data out of band
    into ``buffers``) that writes notebook functions' globals as a
    reference to the user namespace."""
    globals_stand_in: dict = {}

    class Pickler(cloudpickle.Pickler):
        def persistent_id(self, obj):
            if obj is globals_stand_in:
                return _UserNamespace.ID
            return None

    pickler = Pickler(file, protocol=5, buffer_callback=buffers.append)
    pickler.globals_ref[id(shell.user_ns)] = globals_stand_in
    return pickler


def _unpickler(file, shell, buffers: list):
    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            if pid == _UserNamespace.ID:
                return shell.user_ns
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")

    return Unpickler(file, buffers=buffers)


def _why_not(value, error: BaseException) -> str:
    """Why a value can't be saved, in words."""
    if isinstance(value, types.GeneratorType):
        return "a generator: where it stands in its loop can't be saved"
    if isinstance(value, io.IOBase):
        return "an open file: it is a handle in the old kernel's process"
    if isinstance(value, socket.socket):
        return "a socket: its connection belongs to the old kernel's process"
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return f"a {type(value).__name__} that can't be saved ({text[:160]})"


def _trial(value, shell) -> tuple[int | None, str]:
    """(the size ``value`` would take, or None; why not)."""
    if isinstance(value, io.IOBase) and not isinstance(value, (io.StringIO, io.BytesIO)):
        # cloudpickle would save a file open for reading as its whole
        # content, and bring it back as a StringIO: not the file.
        return None, _why_not(value, TypeError("an open file"))
    sink, buffers = _Sink(), []
    try:
        _pickler(sink, shell, buffers).dump(value)
    except Exception as e:  # noqa: BLE001 (whatever pickling raises, the value stays)
        return None, _why_not(value, e)
    return sink.size + sum(b.raw().nbytes for b in buffers), ""


def _random_states() -> dict:
    """The module-level random generators' states: ``random``'s, and numpy's
    global one if numpy is loaded."""
    import random
    states = {"random": random.getstate()}
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        states["numpy"] = np_random.get_state()
    return states


def _set_random_states(states: dict) -> None:
    import random
    if "random" in states:
        random.setstate(states["random"])
    if "numpy" in states:
        import numpy.random
        numpy.random.set_state(states["numpy"])


# --------------------------------------------------------- the snapshots --

class SnapshotError(Exception):
    """A snapshot that can't be written or must not be read; one line."""


def _snapshots_root() -> str:
    root = os.environ.get("CHSPAWNER_SNAPSHOTS")
    if not root:
        raise SnapshotError("this kernel has no place for snapshots "
                            "(CHSPAWNER_SNAPSHOTS is not set)")
    return root


def _own_directory(path: str, create: bool) -> None:
    """``path`` is a directory of this user's that nobody else can write
    (made so, mode 0700, with ``create``)."""
    if create:
        os.makedirs(path, mode=0o700, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise SnapshotError(f"there is no snapshot at {path}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise SnapshotError(f"{path} is not a directory of this user's that only they "
                            "can write: not used")


def _own_file(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise SnapshotError(f"{path} is not a file of this user's that only they can "
                            "write: not loaded")


def _write(path: str, data_chunks) -> None:
    """A new file, mode 0600, written in full or not at all."""
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in data_chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _words_list(names, most: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _cells_words(cells: list[CellRecord], indices) -> str:
    return ", ".join(f"[{cells[i].n}]" for i in indices)


def _size_words(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _age_words(seconds: float) -> str:
    if seconds < 90:
        return f"{max(0, round(seconds))} s old"
    if seconds < 5400:
        return f"{round(seconds / 60)} min old"
    return f"{seconds / 3600:.1f} h old"


class Session:
    """The kernel's recorded session, its snapshots and their restoring."""

    def __init__(self, shell):
        self.shell = shell
        self.recorder = Recorder(shell)

    # ------------------------------------------------------------ saving --

    def snapshot(self, key: str, limit: int | None = None, note: str = "") -> dict:
        """Write the session's snapshot under $CHSPAWNER_SNAPSHOTS/``key``;
        at most ``limit`` bytes of values. Returns the report."""
        if cloudpickle is None:
            raise SnapshotError("cloudpickle is missing beside the session recorder")
        started = time.perf_counter()
        directory = os.path.join(_snapshots_root(), key)
        _own_directory(os.path.dirname(directory), create=True)
        _own_directory(directory, create=True)
        shell, cells = self.shell, self.recorder.cells
        variables = user_variables(shell)
        sizes, why = {}, {}
        for name, value in variables.items():
            size, reason = _trial(value, shell)
            if size is None:
                why[name] = reason
            else:
                sizes[name] = size
        rerun, again, lost = plan(cells, set(variables), set(why), self.recorder.unrecorded)
        too_big = self._fit(cells, variables, sizes, why, limit, again, lost)
        if too_big:
            rerun, again, lost = plan(cells, set(variables), set(why),
                                      self.recorder.unrecorded)
        for name in lost:
            lost[name] = f"{why[name]}; {lost[name]}" if name in why else lost[name]
        saved = {name: variables[name] for name in sizes if name not in again}
        generation = f"{int(time.time() * 1000):x}-{secrets.token_hex(3)}"
        buffers: list = []
        data = io.BytesIO()
        _pickler(data, shell, buffers).dump({"variables": saved, "random": _random_states()})
        raws = [b.raw() for b in buffers]
        _write(os.path.join(directory, f"values-{generation}.pickle"), [data.getbuffer()])
        _write(os.path.join(directory, f"buffers-{generation}.bin"), raws)
        size = data.getbuffer().nbytes + sum(r.nbytes for r in raws)
        manifest = {
            "format": FORMAT, "generation": generation, "created": time.time(),
            "uid": os.getuid(), "python": list(sys.version_info[:2]), "note": note,
            "execution_count": shell.execution_count,
            "buffers": [r.nbytes for r in raws], "bytes": size,
            "cells": [c.to_json() for c in cells], "rerun": rerun,
            "unrecorded": sorted(self.recorder.unrecorded & set(variables)),
            "variables": {
                name: {"type": type(value).__name__,
                       "how": "saved" if name in saved else "lost" if name in lost else "rerun",
                       "bytes": sizes.get(name),
                       "reason": lost.get(name) or why.get(name, "")}
                for name, value in variables.items()},
        }
        _write(os.path.join(directory, MANIFEST), [json.dumps(manifest).encode()])
        for entry in os.listdir(directory):  # the earlier generations'
            if entry.endswith((".pickle", ".bin")) and generation not in entry \
                    and ".tmp-" not in entry:
                os.unlink(os.path.join(directory, entry))
        seconds = time.perf_counter() - started
        return {"ok": True, "action": "snapshot", "key": key, "bytes": size,
                "seconds": round(seconds, 3), "saved": sorted(saved),
                "rerun_cells": [cells[i].n for i in rerun], "rebuilt": sorted(again),
                "lost": lost, "message": self._saved_words(manifest, cells, seconds)}

    def _fit(self, cells, variables, sizes, why, limit, again, lost) -> bool:
        """Within ``limit``: the largest values that re-running can make
        again are left to it, the rest that doesn't fit is not saved. Says
        whether anything moved out of ``sizes`` (into ``why``)."""
        if not limit:
            return False
        total = sum(s for n, s in sizes.items() if n not in again)
        moved = False
        for name in sorted(sizes, key=sizes.get, reverse=True):
            if total <= limit:
                break
            if name in again:
                continue
            total -= sizes.pop(name)
            why[name] = (f"larger than what's left of the snapshot limit "
                         f"({_size_words(limit)})")
            moved = True
        return moved

    @staticmethod
    def _saved_words(manifest: dict, cells: list[CellRecord], seconds: float) -> str:
        kinds = {"saved": [], "rerun": [], "lost": []}
        for name, v in manifest["variables"].items():
            kinds[v["how"]].append(name)
        words = [f"Session saved ({_size_words(manifest['bytes'])} in {seconds:.2f} s): "
                 f"{len(kinds['saved'])} variables"]
        if kinds["rerun"]:
            words.append(f"; {_words_list(kinds['rerun'])} will be rebuilt by re-running "
                         f"cells {_cells_words(cells, manifest['rerun'])}")
        if kinds["lost"]:
            words.append("; can't be kept: " + "; ".join(
                f"{n} ({manifest['variables'][n]['reason']})" for n in sorted(kinds["lost"])))
        return "".join(words) + "."

    # --------------------------------------------------------- restoring --

    def read(self, key: str) -> tuple[dict, dict]:
        """The snapshot ``key``'s manifest and values, after checking that
        it is this user's own and nobody else's to write."""
        directory = os.path.join(_snapshots_root(), key)
        _own_directory(os.path.dirname(directory), create=False)
        _own_directory(directory, create=False)
        manifest = json.loads(self._read_own(os.path.join(directory, MANIFEST)))
        if manifest.get("format") != FORMAT:
            raise SnapshotError(f"snapshot {key} has format {manifest.get('format')!r}, "
                                f"this kernel reads {FORMAT}")
        if manifest.get("uid") != os.getuid():
            raise SnapshotError(f"snapshot {key} is another user's: not loaded")
        if manifest.get("python") != list(sys.version_info[:2]):
            raise SnapshotError(
                "snapshot {} was written by Python {}.{}, this kernel is {}.{}: "
                "not loaded".format(key, *manifest["python"], *sys.version_info[:2]))
        generation = manifest["generation"]
        blob = bytearray(self._read_own(os.path.join(directory, f"buffers-{generation}.bin")))
        view, buffers, at = memoryview(blob), [], 0
        for n in manifest["buffers"]:
            buffers.append(view[at:at + n])
            at += n
        data = self._read_own(os.path.join(directory, f"values-{generation}.pickle"))
        keep = self.shell.user_ns.get("__builtins__")
        try:
            values = _unpickler(io.BytesIO(data), self.shell, buffers).load()
        finally:  # (cloudpickle's function state sets the globals' __builtins__)
            if keep is not None:
                self.shell.user_ns["__builtins__"] = keep
        return manifest, values

    @staticmethod
    def _read_own(path: str) -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as e:
            raise SnapshotError(f"can't read {path}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            _own_file(f.fileno(), path)
            return f.read()

    def restore(self, key: str) -> dict:
        """Bring the snapshot ``key`` back into this kernel. Returns the report."""
        started = time.perf_counter()
        manifest, values = self.read(key)
        shell = self.shell
        shell.user_ns.update(values["variables"])
        cells = [CellRecord.from_json(c) for c in manifest["cells"]]
        rerun_errors = self._rerun(cells, manifest["rerun"])
        _set_random_states(values["random"])
        lost = {}
        for name, v in manifest["variables"].items():
            if v["how"] == "lost":
                lost[name] = v["reason"]
            elif v["how"] == "rerun" and name not in shell.user_ns:
                lost[name] = rerun_errors or "re-running its cells did not make it again"
        # The restored session's history is this kernel's: a later move
        # carries it on.
        self.recorder.cells = cells + self.recorder.cells
        self.recorder.unrecorded = set(manifest.get("unrecorded", ()))
        if manifest.get("execution_count"):
            shell.execution_count = max(shell.execution_count, manifest["execution_count"])
        seconds = time.perf_counter() - started
        age = time.time() - manifest["created"]
        restored = sorted(values["variables"])
        rebuilt = sorted(n for n, v in manifest["variables"].items()
                         if v["how"] == "rerun" and n not in lost)
        report = {"ok": True, "action": "restore", "key": key, "age_s": round(age, 1),
                  "seconds": round(seconds, 3), "bytes": manifest["bytes"],
                  "restored": restored, "rebuilt": rebuilt,
                  "rerun_cells": [cells[i].n for i in manifest["rerun"]], "lost": lost}
        report["message"] = self._restored_words(report, manifest)
        return report

    def _rerun(self, cells: list[CellRecord], indices: list[int]) -> str:
        """Run the cells again, in order, their output captured, unrecorded.
        Returns the first failure in words ('' if none)."""
        from IPython.utils.capture import capture_output
        first = ""
        for i in indices:
            with capture_output(display=True):
                result = self.shell.run_cell(cells[i].code, store_history=False, silent=True)
            error = result.error_before_exec or result.error_in_exec
            if error is not None and not first:
                text = f"{type(error).__name__}: {error}".splitlines()[0][:200]
                first = f"re-running cell [{cells[i].n}] failed: {text}"
        return first

    @staticmethod
    def _restored_words(report: dict, manifest: dict) -> str:
        created = time.strftime("%H:%M:%S", time.localtime(manifest["created"]))
        words = [f"Session restored from the snapshot of {created} "
                 f"({_age_words(report['age_s'])}): {len(report['restored'])} variables loaded"]
        if report["rerun_cells"]:
            cells = ", ".join(f"[{n}]" for n in report["rerun_cells"])
            rebuilt = f" to rebuild {_words_list(report['rebuilt'])}" if report["rebuilt"] else ""
            words.append(f"; re-ran cells {cells}{rebuilt}")
        if report["lost"]:
            words.append("; not restored: " + "; ".join(
                f"{n} ({why})" for n, why in sorted(report["lost"].items())))
        return "".join(words) + "."


# ------------------------------------------- the server's entry points --

_session: Session | None = None


def _answer(action, *args) -> str:
    """One line of JSON: the report, or {"ok": false, "message": why}."""
    if _session is None:
        return json.dumps({"ok": False, "message": "the session recorder is not loaded"})
    try:
        return json.dumps(action(*args))
    except SnapshotError as e:
        return json.dumps({"ok": False, "message": str(e)})
    except Exception as e:  # noqa: BLE001 (the kernel stays; the user is told)
        return json.dumps({"ok": False, "message": f"{type(e).__name__}: {e}".splitlines()[0]})


def snapshot(key: str, limit: int | None = None, note: str = "") -> str:
    """Save the session (the server's call); a one-line JSON report."""
    return _answer(lambda: _session.snapshot(key, limit, note))


def restore(key: str) -> str:
    """Bring a saved session back (the server's call); a one-line JSON report."""
    return _answer(lambda: _session.restore(key))


def recorded() -> str:
    """How many cells are recorded (one line of JSON)."""
    return json.dumps({"ok": _session is not None,
                       "cells": len(_session.recorder.cells) if _session else 0})


def load_ipython_extension(shell) -> None:
    """IPython's extension entry point: start recording."""
    global _session
    if _session is not None:
        return
    _session = Session(shell)
    shell.events.register("pre_run_cell", _session.recorder.before)
    shell.events.register("post_run_cell", _session.recorder.after)
    shell.ast_transformers.append(_session.recorder.catcher)


def unload_ipython_extension(shell) -> None:
    global _session
    if _session is None:
        return
    shell.events.unregister("pre_run_cell", _session.recorder.before)
    shell.events.unregister("post_run_cell", _session.recorder.after)
    if _session.recorder.catcher in shell.ast_transformers:
        shell.ast_transformers.remove(_session.recorder.catcher)
    _session = None
