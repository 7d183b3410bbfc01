"""Detector definitions: rules over SAE features and probes, as YAML files, validated on load.

A rule (``kind: rule``, the default) names a few SAE features and how to turn their per-token
activations into a verdict:

* ``threshold``: per token, a feature counts as active at or above ``absolute`` (activation
  units) or ``relative`` (a share of the feature's maximum activation in the feature atlas);
  a feature may override it with its own ``threshold``.
* ``aggregation``: over the tokens in ``scope``: ``max`` or ``mean`` activation (compared with
  the threshold), or ``count_above`` / ``fraction_above`` (how many tokens, or what share, reach
  the threshold; compared with ``aggregation.at_least``).
* ``combine``: ``any`` feature, ``all`` features, or ``weighted_sum`` (each feature's ratio to
  its cut-off, times its weight, summed and compared with ``combine.at_least``).

A probe (``kind: probe``) is a logistic regression stored beside the catalog: on SAE features
max-pooled over the scope (``input: sae``) or on the mean layer-L residual (``input: residual``).

Every definition names the SAE it was written for by its fingerprint (``sae.fingerprint``) and
is refused against any other: feature 123 of one dictionary means nothing in another.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

Severity = Literal["info", "low", "medium", "high", "critical"]
Scope = Literal["user", "assistant", "system", "tool", "untrusted", "all"]
SEVERITIES: tuple[Severity, ...] = get_args(Severity)
SEVERITY_RANK: dict[str, int] = {s: i for i, s in enumerate(SEVERITIES)}  # info 0 .. critical 4
ID_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"


class RuleError(ValueError):
    """A definition that cannot be loaded: names the file, the rule and the field at fault."""

    def __init__(self, file: Path | str, rule: str | None, field: str | None, message: str):
        self.file, self.rule, self.field, self.message = str(file), rule, field, message
        where = self.file
        if rule:
            where += f": rule {rule!r}"
        if field:
            where += f": field {field!r}"
        super().__init__(f"{where}: {message}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Threshold(_Strict):
    """Exactly one of an absolute activation or a share of the atlas maximum."""

    absolute: Annotated[float, Field(gt=0)] | None = None
    relative: Annotated[float, Field(gt=0, le=1)] | None = None

    @model_validator(mode="after")
    def _one(self) -> Threshold:
        if (self.absolute is None) == (self.relative is None):
            raise ValueError("give exactly one of 'absolute' or 'relative'")
        return self

    def scaled(self, factor: float) -> Threshold:
        if self.absolute is not None:
            return Threshold(absolute=self.absolute * factor)
        assert self.relative is not None
        return Threshold(relative=min(1.0, self.relative * factor))


class FeatureRef(_Strict):
    index: Annotated[int, Field(ge=0)]
    label: Annotated[str, Field(min_length=1)]
    weight: float = 1.0
    threshold: Threshold | None = None  # overrides the rule's threshold for this feature


class Aggregation(_Strict):
    method: Literal["max", "mean", "count_above", "fraction_above"] = "max"
    at_least: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _needs_at_least(self) -> Aggregation:
        counting = self.method in ("count_above", "fraction_above")
        if counting and self.at_least is None:
            raise ValueError(f"method {self.method!r} needs 'at_least'")
        if not counting and self.at_least is not None:
            raise ValueError(f"method {self.method!r} takes no 'at_least' (the threshold is it)")
        if self.method == "fraction_above" and self.at_least is not None and self.at_least > 1:
            raise ValueError("'at_least' of fraction_above is a share, at most 1")
        return self


class Combination(_Strict):
    method: Literal["any", "all", "weighted_sum"] = "any"
    at_least: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _needs_at_least(self) -> Combination:
        if (self.method == "weighted_sum") != (self.at_least is not None):
            raise ValueError("'at_least' is required by weighted_sum and only by it")
        return self


class SAERef(_Strict):
    fingerprint: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{16}$")]
    name: str | None = None


class Annotations(_Strict):
    summary: Annotated[str, Field(min_length=1)]
    runbook: str | None = None


class Calibration(_Strict):
    """Where a detector's operating point came from, written by ``detectors calibrate``.

    ``budget`` is the alert budget: the share of real traffic (``traffic``, ``n_traffic`` turns)
    the detector may fire on. ``target_fpr``/``data``/``n_neg`` record a labelled set's negatives
    instead or beside it. ``scale`` is what a rule's cut-offs were multiplied by in all.
    """

    budget: Annotated[float, Field(ge=0, le=1)] | None = None
    traffic: str | None = None
    n_traffic: int | None = None
    target_fpr: float | None = None
    data: str | None = None
    n_neg: int | None = None
    scale: float | None = None
    at: str


class Window(_Strict):
    """Escalate when a detector fires ``count`` times for one tenant within ``seconds``."""

    count: Annotated[int, Field(ge=2)]
    seconds: Annotated[int, Field(ge=1, le=30 * 86400)]
    severity: Severity = "critical"


class Alerting(_Strict):
    """How fired verdicts become alerts over time (the service applies it)."""

    cooldown_seconds: Annotated[int, Field(ge=1, le=30 * 86400)] | None = None
    window: Window | None = None


class _Definition(_Strict):
    id: Annotated[str, Field(pattern=ID_PATTERN)]
    description: Annotated[str, Field(min_length=1)]
    severity: Severity
    scope: Scope = "all"
    min_tokens: Annotated[int, Field(ge=1)] = 1
    sae: SAERef
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: Annotations
    signal_of: Annotated[str, Field(pattern=ID_PATTERN)] | None = None  # probe beside a rule
    # Cooldown: one alert per conversation and detector per period (later fires are counted on
    # it); window: an escalation alert when the tenant's fires reach a count within a period.
    alerting: Alerting | None = None
    calibration: Calibration | None = None

    @property
    def judged_by(self) -> str:
        """The label its quality is measured on: its own id, or the rule a probe stands beside."""
        return self.signal_of or self.id


class RuleSpec(_Definition):
    kind: Literal["rule"] = "rule"
    features: Annotated[list[FeatureRef], Field(min_length=1)]
    threshold: Threshold
    aggregation: Aggregation = Aggregation()
    combine: Combination = Combination()

    @field_validator("features")
    @classmethod
    def _distinct(cls, features: list[FeatureRef]) -> list[FeatureRef]:
        seen = [f.index for f in features]
        if len(set(seen)) != len(seen):
            raise ValueError("a feature index appears twice")
        return features

    def scaled(self, factor: float) -> RuleSpec:
        """The same rule with every cut-off multiplied by ``factor`` (scores divide by it)."""
        if self.combine.method == "weighted_sum":
            assert self.combine.at_least is not None
            combine = Combination(method="weighted_sum", at_least=self.combine.at_least * factor)
            return self.model_copy(update={"combine": combine})
        if self.aggregation.method in ("count_above", "fraction_above"):
            assert self.aggregation.at_least is not None
            at_least = self.aggregation.at_least * factor
            if self.aggregation.method == "fraction_above":
                at_least = min(1.0, at_least)
            agg = Aggregation(method=self.aggregation.method, at_least=at_least)
            return self.model_copy(update={"aggregation": agg})
        features = [
            f.model_copy(update={"threshold": f.threshold.scaled(factor)}) if f.threshold else f
            for f in self.features
        ]
        return self.model_copy(
            update={"threshold": self.threshold.scaled(factor), "features": features}
        )


class ProbeSettings(_Strict):
    input: Literal["sae", "residual"]
    weights: Annotated[str, Field(min_length=1)]  # .npz file, relative to the YAML file
    threshold: Annotated[float, Field(gt=0, lt=1)]  # on the probability


class ProbeSpec(_Definition):
    kind: Literal["probe"]
    probe: ProbeSettings


Spec = RuleSpec | ProbeSpec


def parse_definition(doc: Any, file: Path | str = "<memory>") -> Spec:
    """Validate one YAML document; RuleError names the file, rule and first field at fault."""
    if not isinstance(doc, dict):
        raise RuleError(file, None, None, "a definition must be a mapping (key: value lines)")
    rule_id = doc.get("id") if isinstance(doc.get("id"), str) else None
    kind = doc.get("kind", "rule")
    if kind not in ("rule", "probe"):
        raise RuleError(file, rule_id, "kind", f"must be 'rule' or 'probe', got {kind!r}")
    cls: type[RuleSpec] | type[ProbeSpec] = RuleSpec if kind == "rule" else ProbeSpec
    try:
        return cls.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        elif first["type"] == "missing":
            message = "required field is missing"
        more = len(exc.errors()) - 1
        if more:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise RuleError(file, rule_id, field, message) from exc


def load_file(path: Path) -> list[Spec]:
    """All definitions in one YAML file (one document, a list, or several ``---`` documents)."""
    try:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except OSError as exc:
        raise RuleError(path, None, None, f"cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise RuleError(path, None, None, f"not valid YAML{line}") from exc
    specs: list[Spec] = []
    for doc in docs:
        if doc is None:
            continue
        for item in doc if isinstance(doc, list) else [doc]:
            specs.append(parse_definition(item, path))
    if not specs:
        raise RuleError(path, None, None, "holds no definitions")
    return specs


def load_definitions(paths: Iterable[Path]) -> list[tuple[Path, Spec]]:
    """Definitions from files and directories (``*.yaml``/``*.yml`` inside); ids must be unique."""
    out: list[tuple[Path, Spec]] = []
    seen: dict[str, Path] = {}
    for path in paths:
        files = (
            sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
            if path.is_dir()
            else [path]
        )
        if path.is_dir() and not files:
            raise RuleError(path, None, None, "directory holds no .yaml files")
        for file in files:
            for spec in load_file(file):
                if spec.id in seen:
                    raise RuleError(file, spec.id, "id", f"already defined in {seen[spec.id]}")
                seen[spec.id] = file
                out.append((file, spec))
    return out


def dump_definition(spec: Spec) -> str:
    """YAML text of a definition, fields in declaration order, defaults left out where unset."""
    doc = spec.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)


def write_definition(spec: Spec, path: Path) -> None:
    """Replace ``path`` with one definition; lands whole or not at all."""
    text = dump_definition(spec)
    parse_definition(yaml.safe_load(text), path)  # never write what would not load back
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def is_identifier(text: str) -> bool:
    return re.fullmatch(ID_PATTERN, text) is not None
