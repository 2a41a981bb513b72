"""Register hf_signround with transformers as soon as transformers' quantizer registry loads.

Run at interpreter start by ``hf_signround_autoload.pth`` (installed into site-packages by
the wheel), and by ``import hf_signround``. transformers has no plug-in entry points, and a
checkpoint whose quant_method is unregistered silently loads as a float model with random
weights; this hook closes that gap without importing torch or transformers itself: it
watches for the module ``transformers.quantizers.auto`` and registers right after it has
executed.

Registering imports ``hf_signround.hf_quantizer``, which imports most of the package. When
the registry loads *because* an hf_signround module is being imported (say
``import hf_signround.quantize``), that import is still under way and cannot be re-entered:
registration then waits until the last hf_signround module being executed has finished.
"""

import importlib.abc
import sys

_TARGET = "transformers.quantizers.auto"
_PACKAGE = "hf_signround"
_executing: set[str] = set()  # watched modules whose code is running now
_state = {"registered": False}


class _RegisterAfterLoad(importlib.abc.Loader):
    """Runs a module through its own loader, then registers if everything needed has loaded."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_source, get_resource_reader, ...: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        _executing.add(module.__name__)
        try:
            self._loader.exec_module(module)
        finally:
            _executing.discard(module.__name__)
        register_when_ready()


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of transformers' quantizer registry and of hf_signround's modules."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET and not fullname.startswith(_PACKAGE + "."):
            return None
        later = sys.meta_path[sys.meta_path.index(self) + 1 :] if self in sys.meta_path else []
        for finder in later:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterLoad(spec.loader)
                return spec
        return None


def register_when_ready() -> None:
    """Register once transformers' registry has loaded and no hf_signround module is mid-import."""
    if _state["registered"] or _TARGET not in sys.modules or _executing:
        return
    try:
        from hf_signround.hf_quantizer import register

        register()
    except Exception as err:  # never break `import transformers` for a plug-in problem
        import logging

        logging.getLogger(_PACKAGE).warning("hf_signround could not register with transformers: %s", err)
        return
    _state["registered"] = True
    for finder in [f for f in sys.meta_path if isinstance(f, _Finder)]:
        sys.meta_path.remove(finder)


def install() -> None:
    """Register now if transformers' quantizer registry is loaded, else the moment it is."""
    if not _state["registered"] and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    register_when_ready()


try:
    install()
except Exception:  # a .pth hook must never stop the interpreter from starting
    pass
