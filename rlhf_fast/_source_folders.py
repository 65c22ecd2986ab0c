"""The two source folders that live beside ``rlhf_fast/`` in a checkout but belong to the package:
``kernels/`` (Triton kernels, the subpackage ``rlhf_fast.kernels``) and ``csrc/`` (C++ sources,
``rlhf_fast._csrc``); docs/architecture.md, "Layout".

Neither folder holds an ``__init__.py``, on purpose (issue 28). A folder with one is a regular
top-level package to any Python that runs with the checkout's root on ``sys.path`` (``python -m
pytest``, ``python -c``, ``torchrun -m``, a script or notebook in the clone), and a regular package
found first shadows every other of that name: the repo's ``kernels/`` hid Hugging Face's
``kernels`` package, which transformers 5.2x imports, and ``import transformers``' integrations
failed with ``cannot import name 'CUDAProperties' from 'kernels'``. A folder without one is at most
a PEP 420 namespace portion, which the import system uses only when no regular package of that name
exists anywhere on ``sys.path`` (and which transformers' own availability check counts as absent).

Where the two subpackages come from:

- a wheel (``pip install .``): pyproject's ``package-dir`` copies the folders to
  ``rlhf_fast/kernels/`` and ``rlhf_fast/_csrc/``, found by the normal import system;
- a checkout (editable install, or the checkout's root on ``PYTHONPATH``): ``map_source_folders``
  registers each as a namespace subpackage over its folder when ``rlhf_fast`` is imported.
  setuptools' editable finder cannot do this itself: it maps a subpackage to a folder only through
  the folder's ``__init__.py``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

#: subpackage of rlhf_fast -> its folder in a checkout, relative to the checkout's root
SOURCE_FOLDERS = {"kernels": "kernels", "_csrc": "csrc"}


def map_source_folders(package) -> None:
    """Makes ``rlhf_fast.<sub>`` importable for each entry of ``SOURCE_FOLDERS`` that is not
    installed as a plain subpackage (the checkout layout): a namespace module whose ``__path__`` is
    the checkout's folder, set as ``package.<sub>`` and in ``sys.modules``. Nothing is imported or
    executed; a folder that does not exist is left alone (importing it then fails as usual)."""
    here = Path(package.__file__).resolve().parent
    for sub, folder in SOURCE_FOLDERS.items():
        name = f"{package.__name__}.{sub}"
        if name in sys.modules or (here / sub).is_dir():  # already there, or installed from a wheel
            continue
        src = here.parent / folder
        if not src.is_dir():
            continue
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(src)]
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        setattr(package, sub, module)
