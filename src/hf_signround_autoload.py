"""Register hf_signround with transformers as soon as transformers' quantizer registry loads.

Run at interpreter start by ``hf_signround_autoload.pth`` (installed into site-packages by
the wheel). transformers has no plug-in entry points, and a checkpoint whose quant_method
is unregistered silently loads as a float model with random weights; this hook closes
that gap without importing torch or transformers at start-up: it only watches for the
module ``transformers.quantizers.auto`` and registers right after it has executed.
"""

import importlib.abc
import importlib.util
import sys

_TARGET = "transformers.quantizers.auto"


class _RegisterAfterLoad(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if "hf_signround" in sys.modules:
            return  # the package is being imported right now; its __init__ registers
        try:
            from hf_signround.hf_quantizer import register

            register()
        except Exception as err:  # never break `import transformers` for a plug-in problem
            import logging

            logging.getLogger("hf_signround").warning("hf_signround could not auto-register: %s", err)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also avoids recursion in find_spec below
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install() -> None:
    if _TARGET in sys.modules:
        from hf_signround.hf_quantizer import register

        register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


try:
    install()
except Exception:  # a .pth hook must never stop the interpreter from starting
    pass
