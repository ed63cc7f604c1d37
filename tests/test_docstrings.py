"""Every public constructor, sampler and call documents every argument: ``help()`` shows an ``Args:`` section
naming each parameter of the signature, and no public constructor or sampler hides arguments behind
``*args`` / ``**kwargs``."""

import inspect

import pytest

import patchmosaic as pm

# public callables that are not checked at all, and why
EXCLUDED = {
    "ResourceError": "an exception: like every exception it takes only its message (no Python signature)",
    "ConfigurationError": "an exception: like every exception it takes only its message (no Python signature)",
}
METHODS = {  # public methods of the machines and denoisers that take user input
    pm.Machine: ("denoise", "eps", "score", "sensitivity"),
    pm.MachineDenoiser: ("__call__", "eps", "score"),
    pm.NetworkDenoiser: ("__call__", "eps", "score"),
    pm.IndexedDenoiser: ("__call__",),
}


def documented_args(doc: str) -> set:
    """The names an ``Args:`` section of ``doc`` (Google style) documents: each entry line, indented as
    the section's first entry, reads ``name: ...``, ``name (type): ...`` or ``a, b, c: ...``."""
    lines = doc.expandtabs().splitlines()
    names = set()
    for i, line in enumerate(lines):
        if line.strip() != "Args:":
            continue
        head = len(line) - len(line.lstrip())
        entry = None
        for sub in lines[i + 1 :]:
            if not sub.strip():
                continue
            indent = len(sub) - len(sub.lstrip())
            if indent <= head:
                break
            entry = indent if entry is None else entry
            if indent == entry and ":" in sub:
                for name in sub.split(":", 1)[0].split(","):
                    names.add(name.split("(")[0].strip())
    return names


def public_callables():
    out = []
    for name in pm.__all__:
        obj = getattr(pm, name)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and name not in EXCLUDED:
            out.append(pytest.param(name, obj, id=name))
    return out


def docs_of(obj) -> str:
    """A class's own docstring and its ``__init__``'s; a function's docstring."""
    if inspect.isclass(obj):
        own_init = obj.__init__ if "__init__" in vars(obj) else None
        return (inspect.getdoc(obj) or "") + "\n" + (own_init.__doc__ or "" if own_init else "")
    return inspect.getdoc(obj) or ""


def check_documented(obj, doc: str, what: str) -> None:
    params = [p for p in inspect.signature(obj).parameters.values() if p.name != "self"]
    hidden = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert not hidden, f"{what} hides arguments behind *{'/**'.join(hidden)}"
    private = [p.name for p in params if p.name.startswith("_")]
    assert not private, f"{what} has private parameters {private} in its public signature"
    missing = [p.name for p in params if p.name not in documented_args(inspect.cleandoc(doc))]
    assert not missing, f"{what}: no Args entry for {missing}"


@pytest.mark.parametrize("name, obj", public_callables())
def test_public_callable_documents_every_argument(name, obj):
    check_documented(obj, docs_of(obj), f"patchmosaic.{name}")


@pytest.mark.parametrize("cls, method", [(c, m) for c, ms in METHODS.items() for m in ms] +
                         [(c, m) for c in (pm.IS, pm.LS, pm.ELS, pm.Wiener) for m in METHODS[pm.Machine]] +
                         [(pm.Wiener, "statistics"), (pm.Wiener, "check_request")],
                         ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_public_methods_document_every_argument(cls, method):
    fn = getattr(cls, method)
    check_documented(fn, inspect.getdoc(fn) or "", f"{cls.__name__}.{method}")


def test_the_check_reads_args_sections():
    def f(a, b, *, c=1):
        """One line.

        Args:
            a: first, with a colon: inside.
                continued: not an entry
            b (int): second.
        Returns:
            c: not an argument.
        """

    assert documented_args(inspect.getdoc(f)) == {"a", "b"}
    with pytest.raises(AssertionError, match=r"no Args entry for \['c'\]"):
        check_documented(f, inspect.getdoc(f), "f")
    with pytest.raises(AssertionError, match="hides arguments"):
        check_documented(lambda x, **kw: x, "Args:\n    x: y\n    kw: z", "g")
    with pytest.raises(AssertionError, match=r"private parameters \['_build'\]"):
        check_documented(lambda x, _build=True: x, "Args:\n    x: y\n    _build: z", "h")


def test_help_shows_the_machine_arguments():
    """The issue's own example: help(pm.ELS) and help(pm.ddim) list every argument."""
    els, ddim = pm.ELS.__doc__, pm.ddim.__doc__
    for name in ("schedule", "backend", "n_threads", "max_memory", "boundary", "wrapped", "labels"):
        assert f"{name}:" in els
    assert len(ddim.splitlines()) > 10 and "x1:" in ddim and "numpy" in ddim
