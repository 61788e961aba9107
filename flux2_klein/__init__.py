"""flux2-klein-triton: FLUX.2 [klein] on NVIDIA Triton Inference Server."""

__version__ = "0.1.0"
# The checkout's top-level folders that are subpackages (pyproject.toml's package-dir maps them in; a wheel
# has them inside this folder). tests/test_wheel.py keeps this and pyproject.toml equal.
CHECKOUT_SUBPACKAGES = ("export", "client", "model_repository")


def _map_checkout_subpackages() -> None:
    """Let a raw checkout import `flux2_klein.export`, `.client` and `.model_repository`.

    pyproject.toml maps the repository's top-level `export/`, `client/` and `model_repository/` into the
    package (package-dir), so an installed wheel and the editable install have them, but the raw
    `flux2_klein/` folder does not: `python -m flux2_klein.cli` run from a checkout root without the
    editable install (or a Docker build whose working directory holds the copied sources, issue 19.1)
    found this folder first on sys.path and then failed with "No module named 'flux2_klein.export'".

    A finder for exactly those three names rather than the checkout root added to `__path__`: that would
    make every top-level folder a subpackage too (`flux2_klein.tests`, `.bench`, `.docs`, `.docker`, even
    `.flux2_klein`, a second copy of this package under another name), all of it importable by accident,
    and `pkgutil.walk_packages` would wander into all of it. It is appended to sys.meta_path, so
    an editable install's finder (which maps the same three names to the same folders) answers first; it
    is installed only when this package is the raw folder (no `export/` inside it, as a wheel has) and the
    three siblings are there.
    """
    import importlib.abc
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    root = here.parent
    mapped = {f"{__name__}.{name}": root / name for name in CHECKOUT_SUBPACKAGES}
    if (here / "export").exists() or not all((p / "__init__.py").is_file() for p in mapped.values()):
        return

    class _CheckoutFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            folder = mapped.get(fullname)
            if folder is None:
                return None  # submodules (flux2_klein.export.fp8) follow the parent's __path__
            return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])

    if not any(type(f).__name__ == "_CheckoutFinder" for f in sys.meta_path):
        sys.meta_path.append(_CheckoutFinder())


_map_checkout_subpackages()
del _map_checkout_subpackages
