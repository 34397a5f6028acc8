"""Pipeline specs: a pydantic model, loaded from TOML, naming one registered stage per kind.

::

    name = "clasp"
    budget = 128                  # tokens kept per image (or: budget_ratio = 0.25)
    class_table = "default"       # or a path to a table TOML, relative to this file

    [router]
    stage = "keyword"

    [scoring]
    stage = "cls-attention"
    layer = -2                    # every other key is a parameter of that stage
    ...

Unknown keys are errors (``extra="forbid"`` at every level); a stage's parameters are validated by
that stage's own pydantic model; an unknown stage name lists the valid choices.

A spec file may **extend** another (``extends = "clasp"``: a preset name, or a path relative to
this file) and give only what it changes: top-level keys replace the base's; a stage table with
the base's stage (or no ``stage`` key) changes only the parameters it names; a table naming another
stage replaces the base's table. So an ablation variant is a few lines::

    extends = "clasp"
    name = "clasp-divprune-completion"

    [completion]
    stage = "divprune"

A pipeline needs only the stages it uses: ``router`` (default: ``fixed``, class ``general``),
``scoring`` (default: ``none``, no pivot signal), ``selection`` (``top-k``), ``budget_policy``
(``fixed``, ratio 0: no pivots) and ``fusion`` (``single-layer`` at layer -2, selection only) may be
left out, and ``class_table`` defaults to the shipped table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .budget import Budget, BudgetLike
from .classes import ClassTable
from .registry import Registry, get_registry
from .stages import KINDS, BudgetPolicy, Completion, Fusion, LlmPruner, Router, Scorer, Selector, Stage
from .tomlfile import describe_problems, read_toml

__all__ = ["PipelineSpec", "load_spec", "presets", "spec_file", "spec_data", "merge_spec_data", "DEFAULT_STAGES"]

#: the stage a spec gets for a kind it leaves out: what a pipeline without that step does
DEFAULT_STAGES: dict[str, dict[str, Any]] = {
    "router": {"stage": "fixed", "class_name": "general"},
    "fusion": {"stage": "single-layer", "layer": -2, "feed": "selection"},
    "scoring": {"stage": "none"},
    "selection": {"stage": "top-k"},
    "budget_policy": {"stage": "fixed", "ratio": 0.0},
}


def _default_stage(kind: str) -> Any:  # the kind's own Stage subclass
    """The stage a spec gets for ``kind`` when it leaves it out (:data:`DEFAULT_STAGES`)."""
    return _stage_from_table(kind, DEFAULT_STAGES[kind], get_registry())


def _stage_from_table(kind: str, table: dict[str, Any], registry: Registry) -> Stage:
    """The registered ``kind`` stage that ``table`` (``{stage = NAME, ...parameters}``) names, its
    parameters validated by the stage's own model; errors name the stage and the field."""
    params = dict(table)
    name = params.pop("stage")
    try:
        found = registry.get(kind, name)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    try:
        return found.cls.model_validate(params)
    except ValidationError as exc:
        raise ValueError(f"bad parameters for {kind} '{name}': {_format_errors(kind, exc, found.cls)}") from None


def _registry(info: ValidationInfo) -> Registry:
    ctx = info.context or {}
    return ctx.get("registry") or get_registry()


def _format_errors(prefix: str, err: ValidationError, cls: type[BaseModel] | None = None) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and cls is not None:
            msg = f"unknown parameter; its parameters are {', '.join(sorted(cls.model_fields)) or 'none'}"
        parts.append(f"{prefix}.{loc}: {msg}" if loc else f"{prefix}: {msg}")
    return "; ".join(parts)


class PipelineSpec(BaseModel):
    """A complete pipeline: one stage per kind, a budget and a class table.

    Attributes:
        name: a label for reports.
        description: free text.
        budget: default tokens kept per image (``> 0``); a call may override it.
        budget_ratio: alternatively, the default share of each image's tokens to keep, in
            ``(0, 1]``. At most one of ``budget`` and ``budget_ratio``.
        class_table: ``"default"``, a path to a table TOML (relative to the spec file), or an
            inline table.
        router, fusion, scoring, selection, completion, budget_policy: ``{stage = name, ...params}``.
        image_downsample: the image down-sampling baseline: resize each image so that the
            encoder makes about ``budget`` tokens (``floor(sqrt(R))**2``), and keep them all.
            Families that cannot resize inside the model (Qwen: use the processor's
            ``max_pixels``) raise a clear error.
        llm: optional in-LLM pruner ``{stage = name, ...params}``. With it, the budget is the
            count per image left after the LLM pruner's last layer, and the pre-LLM stages keep
            ``pre_llm_budget`` tokens per image (every token when it is not set).
        pre_llm_budget: with an ``[llm]`` stage, the tokens per image (int) or the share of each
            image's tokens (float in ``(0, 1]``) that the pre-LLM stages keep: a pre-LLM method and
            an in-LLM one in one spec. Not allowed without ``[llm]``.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)

    name: str = "pipeline"
    description: str = ""
    budget: int | None = Field(None, gt=0)
    budget_ratio: float | None = Field(None, gt=0, le=1)
    class_table: ClassTable = Field(default_factory=ClassTable.default)
    router: Router = Field(default_factory=lambda: _default_stage("router"))
    fusion: Fusion = Field(default_factory=lambda: _default_stage("fusion"))
    scoring: Scorer = Field(default_factory=lambda: _default_stage("scoring"))
    selection: Selector = Field(default_factory=lambda: _default_stage("selection"))
    completion: Completion
    budget_policy: BudgetPolicy = Field(default_factory=lambda: _default_stage("budget_policy"))
    llm: LlmPruner | None = None
    pre_llm_budget: int | float | None = Field(None, gt=0)
    image_downsample: bool = False

    _stage_names: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("class_table", mode="before")
    @classmethod
    def _load_table(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            if value == "default":
                return ClassTable.default()
            base = Path((info.context or {}).get("base_dir", "."))
            path = Path(value) if Path(value).is_absolute() else base / value
            if not path.exists():
                raise ValueError(f"class table file '{path}' does not exist (give 'default' or a path)")
            return ClassTable.load(path)
        return value

    @field_validator(*KINDS, mode="before")
    @classmethod
    def _build_stage(cls, value: Any, info: ValidationInfo) -> Stage | None:
        kind = str(info.field_name)
        if value is None and KINDS[kind].optional:
            return None
        if isinstance(value, Stage):
            return value
        if isinstance(value, str):
            value = {"stage": value}
        if not isinstance(value, dict) or "stage" not in value:
            raise ValueError(f"give a table with a 'stage' key naming a registered {kind} stage")
        return _stage_from_table(kind, value, _registry(info))

    @model_validator(mode="wrap")
    @classmethod
    def _remember_names(cls, data: Any, handler: Any) -> PipelineSpec:
        names = {}
        if isinstance(data, dict):
            for f in KINDS:
                v = data.get(f)
                if isinstance(v, dict) and "stage" in v:
                    names[f] = v["stage"]
                elif isinstance(v, str):
                    names[f] = v
                elif v is None and f in DEFAULT_STAGES:
                    names[f] = DEFAULT_STAGES[f]["stage"]
        spec = handler(data)
        spec._stage_names.update(names)
        return spec

    @model_validator(mode="after")
    def _one_budget(self) -> PipelineSpec:
        if self.budget is not None and self.budget_ratio is not None:
            raise ValueError("give at most one of 'budget' (tokens per image) and 'budget_ratio'")
        if self.image_downsample and self.llm is not None:
            raise ValueError("image_downsample and an [llm] stage each spend the whole budget: use one of them")
        pre = self.pre_llm_budget
        if pre is not None:
            if self.llm is None:
                raise ValueError("pre_llm_budget is what the pre-LLM stages keep when an [llm] stage prunes after "
                                 "them; this spec has no [llm] stage: use 'budget' instead")
            Budget.parse(pre)  # a float is a share in (0, 1]
            if isinstance(pre, int) and isinstance(self.budget, int) and self.budget > pre:
                raise ValueError(f"budget = {self.budget} is what the LLM keeps after its last pruning layer, so it "
                                 f"cannot exceed pre_llm_budget = {pre}, what enters the LLM")
        return self

    # -- views ----------------------------------------------------------------------------------
    def budget_or_default(self, budget: BudgetLike | None = None) -> Budget | None:
        """``budget`` if given, else the spec's ``budget`` or ``budget_ratio`` (``None`` if
        neither), parsed (:meth:`tokenprune.budget.Budget.parse`)."""
        if budget is None:
            budget = self.budget if self.budget is not None else self.budget_ratio
        return None if budget is None else Budget.parse(budget)

    @property
    def completion_fixes_budget(self) -> bool:
        """Whether the completion stage decides each row's token count (pooling), so the spec
        needs no budget."""
        return type(self.completion).fixed_budget is not Completion.fixed_budget

    def stage(self, kind: str) -> Stage:
        """The stage of kind ``kind`` (a key of :data:`tokenprune.stages.KINDS`); a ``KeyError`` for
        an optional kind this spec leaves out."""
        found = getattr(self, kind)
        if found is None:
            raise KeyError(f"the spec '{self.name}' has no [{kind}] stage")
        return found

    def stage_name(self, kind: str, registry: Registry | None = None) -> str:
        """The registered name of the stage of kind ``kind``."""
        if kind in self._stage_names:
            return self._stage_names[kind]
        cls = type(self.stage(kind))
        info = (registry or get_registry()).registration(cls)
        return info.name if info is not None else cls.__name__

    def replace(self, **changes: Any) -> PipelineSpec:
        """A copy with some fields swapped (stage fields take ``{stage=..., ...}`` or a name)."""
        data = self.resolved()
        data.update(changes)
        return PipelineSpec.model_validate(data)

    def resolved(self) -> dict[str, Any]:
        """The spec with every default filled in, as plain data (``tokenprune spec show``)."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        if self.budget is not None:
            out["budget"] = self.budget
        if self.budget_ratio is not None:
            out["budget_ratio"] = self.budget_ratio
        table = self.class_table.model_dump(exclude_none=True)
        for row in table["classes"].values():  # a row without budget bands is the paper's: no empty list shown
            if not row.get("bands"):
                row.pop("bands", None)
        out["class_table"] = table
        if self.image_downsample:
            out["image_downsample"] = True
        if self.pre_llm_budget is not None:
            out["pre_llm_budget"] = self.pre_llm_budget
        for kind in KINDS:
            stage = getattr(self, kind)
            if stage is not None:
                out[kind] = {"stage": self.stage_name(kind), **stage.model_dump()}
        return out


def load_spec(path: str | Path, registry: Registry | None = None, **overrides: Any) -> PipelineSpec:
    """Read and validate a spec TOML file, or a shipped preset by name (:func:`spec_file`), with
    the spec it ``extends`` merged under it. ``overrides`` replace top-level keys."""
    path = spec_file(path)
    data = spec_data(path)
    data.update(overrides)
    ctx: dict[str, Any] = {"base_dir": str(path.parent)}
    if registry is not None:
        ctx["registry"] = registry
    try:
        return PipelineSpec.model_validate(data, context=ctx)
    except ValidationError as exc:
        raise ValueError(describe_problems(exc, PipelineSpec, "spec file", path)) from None


def spec_data(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A spec file's data with the chain of specs it ``extends`` merged under it (see the module
    docstring), and class-table paths made absolute, so that each is read relative to its file."""
    data = read_toml(path, "spec file")
    _absolute_table(data, path.parent)
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise ValueError(f"spec file '{path}': extends must be a preset name or a path, got {base_name!r}")
    candidate = path.parent / base_name
    base_path = candidate if candidate.suffix == ".toml" and candidate.exists() else spec_file(base_name)
    if base_path.resolve() in {p.resolve() for p in (*_seen, path)}:
        chain = " -> ".join(str(p) for p in (*_seen, path, base_path))
        raise ValueError(f"spec file '{path}': extends goes round in a circle ({chain})")
    return merge_spec_data(spec_data(base_path, (*_seen, path)), data)


def merge_spec_data(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: top-level keys replace; a stage table with the base's stage (or no
    ``stage`` key) merges its parameters into the base's; one naming another stage replaces it."""
    out = dict(base)
    for key, value in child.items():
        old = base.get(key)
        if key in KINDS and isinstance(value, dict) and isinstance(old, dict) and \
                value.get("stage", old.get("stage")) == old.get("stage"):
            out[key] = {**old, **value}
        else:
            out[key] = value
    return out


def _absolute_table(data: dict[str, Any], base_dir: Path) -> None:
    table = data.get("class_table")
    if isinstance(table, str) and table != "default" and not Path(table).is_absolute():
        data["class_table"] = str((base_dir / table).resolve())


PRESET_FOLDERS = ("", "methods", "variants")


def preset_root() -> Path:
    """The folder of the shipped preset specs: ``specs/`` of a checkout, else the installed
    ``tokenprune_specs`` package."""
    import importlib.util

    checkout = Path(__file__).resolve().parent.parent / "specs"
    if (checkout / "clasp.toml").exists():
        return checkout
    found = importlib.util.find_spec("tokenprune_specs")
    for folder in (found.submodule_search_locations or []) if found else []:
        if (Path(folder) / "clasp.toml").exists():
            return Path(folder)
    raise FileNotFoundError("the preset specs are not installed (tokenprune_specs has no clasp.toml)")


def presets() -> dict[str, Path]:
    """Every shipped preset by name: ``clasp``, the methods (``visionzip``, ``divprune``...) and the
    variants (``random``...), each a spec file."""
    root = preset_root()
    found: dict[str, Path] = {}
    for folder in PRESET_FOLDERS:
        for path in sorted((root / folder).glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def spec_file(name_or_path: str | Path) -> Path:
    """A spec file from a user's word: an existing path, or the name of a shipped preset
    (``clasp``, ``visionzip``, ``dart-llm-released``...)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    known = presets()
    if str(name_or_path) in known:
        return known[str(name_or_path)]
    raise FileNotFoundError(f"spec file '{name_or_path}' does not exist and no preset has that name; "
                            f"presets: {', '.join(known)}")
