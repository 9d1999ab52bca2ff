"""adapterhub: a git-like, version-controlled registry for PEFT adapters.

Start with `Registry` (adapterhub.registry); results are dataclasses in
`adapterhub.results`, errors in `adapterhub.errors`. Importing this package never
imports torch, peft or transformers.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import adapterhub` stays cheap for the CLI's start-up.
    if name == "Registry":
        from .registry import Registry

        return Registry
    raise AttributeError(name)


__all__ = ["Registry", "__version__"]
