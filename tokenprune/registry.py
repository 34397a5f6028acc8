"""Plugin discovery: the ``tokenprune`` entry-point group -> a registry of named stages.

There is no module-level manager: :func:`get_registry` builds one (and caches it until
:func:`get_registry.cache_clear`), and tests build fresh ones with :func:`build_registry`.

**Switching plugins off.** ``TOKENPRUNE_DISABLE`` holds a comma-separated list of what to leave
out: a distribution's name (every entry point it installs, e.g. ``tp-thirdparty``), one stage as
``KIND:NAME`` (``completion:divprune``), one adapter as ``adapter:MODELCLASS``, or one command as
``command:NAME``. ``tokenprune plugins`` shows what each entry switched off, and an entry that
matches nothing.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .stages import KINDS, Stage

__all__ = ["StageInfo", "AdapterInfo", "Registry", "RegistryError", "Disabled", "build_registry", "get_registry",
           "stage_label", "DISABLE_VARIABLE"]

#: the environment variable that switches plugins, stages, adapters or commands off
DISABLE_VARIABLE = "TOKENPRUNE_DISABLE"


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


@dataclass
class Disabled:
    """What ``TOKENPRUNE_DISABLE`` switches off, and what each of its entries matched."""

    entries: tuple[str, ...] = ()
    matched: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Disabled:
        raw = os.environ.get(DISABLE_VARIABLE, "")
        return cls(tuple(e.strip() for e in raw.split(",") if e.strip()))

    def hits(self, *keys: str, what: str) -> bool:
        """Whether an entry names one of ``keys`` (matched case-insensitively, ``_`` as ``-``);
        records ``what`` it switched off."""
        wanted = {_normal(k) for k in keys}
        found = [e for e in self.entries if _normal(e) in wanted]
        for e in found:
            self.matched.setdefault(e, []).append(what)
        return bool(found)

    def unmatched(self) -> list[str]:
        return [e for e in self.entries if e not in self.matched]

class RegistryError(RuntimeError):
    """A plugin could not be loaded or registered."""


@dataclass(frozen=True)
class StageInfo:
    """One registered stage.

    Attributes:
        kind: its kind's name in :data:`tokenprune.stages.KINDS` (the spec table).
        name: the name a spec gives in ``stage = "..."``.
        cls: the stage class.
        distribution, version: the installed distribution that registered it.
        plugin: its entry point (``name = module``) or plugin name.
    """

    kind: str
    name: str
    cls: type[Stage]
    distribution: str
    version: str
    plugin: str

    def parameters(self) -> dict[str, dict[str, Any]]:
        """Parameter name -> {type, default, description} from the stage's pydantic fields."""
        out = {}
        for pname, f in self.cls.model_fields.items():
            out[pname] = {
                "type": _type_name(f.annotation),
                "default": None if f.is_required() else f.get_default(call_default_factory=True),
                "required": f.is_required(),
                "description": f.description or "",
            }
        return out


@dataclass(frozen=True)
class AdapterInfo:
    """One registered model-family adapter.

    Attributes:
        model_class: the ``__name__`` of the transformers model class it prunes.
        cls: the adapter class (a subclass of :class:`tokenprune.adapters.Adapter`).
        distribution, version, plugin: where it came from, as for stages.
    """

    model_class: str
    cls: type
    distribution: str
    version: str
    plugin: str


def _type_name(annotation: Any) -> str:
    name = getattr(annotation, "__name__", None)
    return name if name and not getattr(annotation, "__args__", None) else str(annotation).replace("typing.", "")


@dataclass
class Registry:
    """Stages by kind and name, with the distribution that provided each."""

    stages: dict[str, dict[str, StageInfo]] = field(
        default_factory=lambda: {k: {} for k in KINDS}
    )
    manager: pluggy.PluginManager | None = None
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)
    #: id(plugin) -> (distribution, version, entry point label), for :meth:`origin`
    origins: dict[int, tuple[str, str, str]] = field(default_factory=dict)
    #: what ``TOKENPRUNE_DISABLE`` switched off
    disabled: Disabled = field(default_factory=Disabled)

    def add(self, kind: str, name: str, cls: Any, distribution: str, version: str, plugin: str) -> None:
        if self.disabled.hits(f"{kind}:{name}", what=f"{kind} stage '{name}' of {distribution}"):
            return
        base = KINDS[kind].base
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{distribution} ({plugin}) registered a {kind} stage with invalid name {name!r}")
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise RegistryError(
                f"{distribution} ({plugin}) registered {kind} stage '{name}' as {cls!r}, "
                f"which is not a subclass of tokenprune.stages.{base.__name__}"
            )
        if getattr(cls, "__abstractmethods__", None):
            raise RegistryError(
                f"{distribution} ({plugin}) registered {kind} stage '{name}' = {cls.__name__}, which leaves "
                f"abstract methods unimplemented: {sorted(cls.__abstractmethods__)}"
            )
        prior = self.stages[kind].get(name)
        if prior is not None:
            raise RegistryError(
                f"{kind} stage name '{name}' is registered twice: by distribution '{prior.distribution}' "
                f"({prior.plugin} -> {prior.cls.__module__}.{prior.cls.__qualname__}) and by distribution "
                f"'{distribution}' ({plugin} -> {cls.__module__}.{cls.__qualname__}); "
                "uninstall one or rename its stage"
            )
        self.stages[kind][name] = StageInfo(kind, name, cls, distribution, version, plugin)

    def add_adapter(self, model_class: str, cls: Any, distribution: str, version: str, plugin: str) -> None:
        if isinstance(model_class, str) and self.disabled.hits(f"adapter:{model_class}",
                                                               what=f"adapter for {model_class} of {distribution}"):
            return
        if not isinstance(model_class, str) or not model_class:
            raise RegistryError(f"{distribution} ({plugin}) registered an adapter for the model class {model_class!r}; "
                                "give the class's __name__, such as 'LlavaForConditionalGeneration'")
        if not _is_adapter_class(cls) or getattr(cls, "__abstractmethods__", None):
            raise RegistryError(f"{distribution} ({plugin}) registered {cls!r} for {model_class}, which is not a "
                                "concrete subclass of tokenprune.adapters.Adapter")
        prior = self.adapters.get(model_class)
        if prior is not None:
            raise RegistryError(
                f"{model_class} has two adapters: {prior.cls.__module__}.{prior.cls.__qualname__} from distribution "
                f"'{prior.distribution}' and {cls.__module__}.{cls.__qualname__} from distribution '{distribution}'; "
                "uninstall one, or register yours for a subclass of the model")
        self.adapters[model_class] = AdapterInfo(model_class, cls, distribution, version, plugin)

    def get(self, kind: str, name: str) -> StageInfo:
        """Look a stage up; an unknown name lists the valid choices."""
        if kind not in self.stages:
            raise KeyError(f"unknown stage kind '{kind}'; kinds: {list(self.stages)}")
        try:
            return self.stages[kind][name]
        except KeyError:
            choices = ", ".join(sorted(self.stages[kind])) or "(none registered)"
            raise KeyError(f"unknown {kind} '{name}'; valid choices: {choices}") from None

    def registration(self, cls: type[Stage]) -> StageInfo | None:
        """How the stage class ``cls`` was registered (``None``: used without registering)."""
        found = [info for info in self.stages.get(cls.kind, {}).values() if info.cls is cls]
        return found[0] if found else None

    def implementations(self, hook: str) -> list[Any]:
        """The plugins' implementations of ``hook``, in registration order."""
        if self.manager is None:
            return []
        return list(reversed(getattr(self.manager.hook, hook).get_hookimpls()))

    def origin(self, plugin: object) -> str:
        """``"distribution NAME VERSION"`` of a registered plugin (module or object)."""
        dist, version, label = self.origins.get(id(plugin), ("?", "?", "?"))
        return f"plugin {label}" if dist == "<local>" else f"distribution {dist} {version}".rstrip()

    def names(self, kind: str) -> list[str]:
        return sorted(self.stages[kind])

    def __iter__(self):
        for kind in self.stages:
            for name in sorted(self.stages[kind]):
                yield self.stages[kind][name]


def _entry_points() -> list[md.EntryPoint]:
    """Entry points of the ``tokenprune`` group, one per (distribution, name, target)."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for ep in md.entry_points(group=hookspecs.PROJECT):
        dist = ep.dist.metadata["Name"] if ep.dist is not None else "?"
        key = (dist.lower().replace("_", "-"), ep.name, ep.value)
        if key not in seen:  # the same distribution may be visible twice on sys.path
            seen.add(key)
            out.append(ep)
    return out


def build_registry(extra_plugins: tuple[tuple[str, object], ...] = (), disabled: Disabled | None = None) -> Registry:
    """Load every plugin of the ``tokenprune`` entry-point group and collect its stages.

    Args:
        extra_plugins: ``(name, plugin)`` pairs registered as well (modules or objects with
            hookimpls); their distribution shows as ``<local>``. Tests use this.
        disabled: what to leave out (default: from ``TOKENPRUNE_DISABLE``).

    Raises:
        RegistryError: a plugin fails to import, implements an unknown hook, registers a
            non-stage, or two plugins register the same name for a kind.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    disabled = disabled if disabled is not None else Disabled.from_env()
    origin: dict[int, tuple[str, str, str]] = {}  # id(plugin) -> (dist, version, ep label)
    for ep in _entry_points():
        dist = ep.dist.metadata["Name"] if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        label = f"{ep.name} = {ep.value}"
        if disabled.hits(dist, what=f"distribution {dist} {version}: entry point {label}"):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # an entry point that does not import is a user-facing error
            raise RegistryError(
                f"entry point '{label}' of distribution '{dist}' failed to load: {exc!r}"
            ) from exc
        if pm.is_registered(plugin):
            continue
        pm.register(plugin, name=f"{dist}:{ep.name}")
        origin[id(plugin)] = (dist, version, label)
    for name, plugin in extra_plugins:
        pm.register(plugin, name=name)
        origin[id(plugin)] = ("<local>", "", name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise RegistryError(f"a tokenprune plugin implements an unknown hook: {exc}") from exc

    registry = Registry(manager=pm, origins=origin, disabled=disabled)
    for kind in KINDS.values():
        _collect(registry, kind.hook, functools.partial(registry.add, kind.name))
    _collect(registry, "register_adapters", registry.add_adapter)
    return registry


def _collect(registry: Registry, hook: str, add: Any) -> None:
    """Call every implementation of the catalogue hook ``hook`` with a ``register(name, cls)``
    callback that hands ``add(name, cls, distribution, version, plugin)`` the implementing plugin's
    origin."""
    for impl in registry.implementations(hook):
        origin = registry.origins.get(id(impl.plugin), ("?", "?", impl.plugin_name))

        def register(name: str, cls: Any, _origin: tuple[str, str, str] = origin) -> None:
            add(name, cls, *_origin)

        impl.function(**{arg: register for arg in impl.argnames if arg == "register"})


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry of installed plugins, built on first use.

    Call ``get_registry.cache_clear()`` after installing a plugin in a running process.
    """
    return build_registry()


def stage_label(stage: Stage, name: str | None = None) -> str:
    """``"completion stage 'divprune' (tokenprune_plugins.completion.DivPrune, distribution ...)"``:
    the kind, the registered name, the class and, when it can be found, the installed
    distribution that provides it (for error messages; not on any hot path)."""
    cls = type(stage)
    info = get_registry().registration(cls)
    found = [(info.distribution, info.version)] if info is not None else []
    if not found:  # a stage class used without registering it: ask the installed packages
        found = [(d, md.version(d)) for d in md.packages_distributions().get(cls.__module__.split(".")[0], [])]
    if info is not None and info.distribution == "<local>":  # registered in-process (build_registry(extra_plugins))
        dist = f", registered by plugin {info.plugin}"
    else:
        dist = f", distribution {found[0][0]} {found[0][1]}" if found else ""
    name = name or (info.name if info is not None else cls.__name__)
    return f"{cls.kind} stage '{name}' ({cls.__module__}.{cls.__qualname__}{dist})"


def _is_adapter_class(cls: Any) -> bool:
    """Whether ``cls`` subclasses ``tokenprune.adapters.base.Adapter``, read from its MRO by name:
    the registry sits below the adapters in the import graph and does not import them."""
    return isinstance(cls, type) and any(
        (base.__module__, base.__qualname__) == ("tokenprune.adapters.base", "Adapter") for base in cls.__mro__)
