"""Landmark schemas: which landmarks a model detects, their sub-anatomies, roles and guidelines.

A schema is a JSON file (see Resources/Schemas/brain-88.json). Built-in schemas are addressed by name
(``brain-88``, ``afids-32``); anything else is a path to a user schema, validated on load.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import LandmarkError
from .resources import resources_dir

DEFAULT_SCHEMA = "brain-88"
PLANES = ("mid-sagittal", "sagittal", "axial", "coronal", "oblique")
ROLES = ("primary", "secondary")
MAX_RATER_SD_MM = 20.0
_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")


@dataclass(frozen=True)
class SubAnatomy:
    name: str
    plane: str
    color: str
    guideline: str
    plane_definition: str = ""
    reference_rule: str = ""  # how the shipped reference annotation placed its points (rule or judgement)

    @property
    def rgb(self) -> tuple[float, float, float]:
        return tuple(int(self.color[i : i + 2], 16) / 255.0 for i in (1, 3, 5))


@dataclass(frozen=True)
class Landmark:
    number: int
    name: str
    sub_anatomy: str
    role: str
    definition: str
    between: tuple[str, str] | None = None
    fraction: float | None = None
    aliases: tuple[str, ...] = ()
    mirror: str | None = None  # the left-right counterpart (None: a midline landmark, its own mirror)
    # How far trained raters place this landmark from their consensus: the SD per axis (mm) of a 3-D
    # Gaussian. Ellipsoids calibrated on exact truths add it (calibrate.py); 0 where no study measured it.
    rater_sd_mm: float = 0.0


PLANE_KEYS = ("mid-sagittal", "axial", "ac", "pc", "anterior", "sub_anatomies", "note")


@dataclass(frozen=True)
class SchemaPlanes:
    """The schema's optional top-level "planes" object: which landmarks define which scan plane.

    ``{"mid-sagittal": {"landmarks": [...]}, "axial": {"landmarks": [...]}, "ac": "AC", "pc": "PC",
    "anterior": {"from": "...", "to": "..."}, "sub_anatomies": [...], "note": "..."}``, every key optional.
    ``ac`` and ``pc`` come together (an AC-PC frame exists only where a schema names both); ``anterior``
    names two landmarks whose direction points forward in the head, used to orient plane normals where
    there is no AC and PC; ``sub_anatomies`` lists the sub-anatomies that get their own best-fit plane.
    Landmark names are stored canonical (aliases in the file are resolved).
    """

    mid_sagittal: tuple[str, ...] = ()
    axial: tuple[str, ...] = ()
    ac: str | None = None
    pc: str | None = None
    anterior: tuple[str, str] | None = None
    sub_anatomies: tuple[str, ...] | None = None
    note: str = ""

    def to_dict(self) -> dict:
        d = {}
        if self.mid_sagittal:
            d["mid-sagittal"] = {"landmarks": list(self.mid_sagittal)}
        if self.axial:
            d["axial"] = {"landmarks": list(self.axial)}
        if self.ac:
            d["ac"], d["pc"] = self.ac, self.pc
        if self.anterior:
            d["anterior"] = {"from": self.anterior[0], "to": self.anterior[1]}
        if self.sub_anatomies is not None:
            d["sub_anatomies"] = list(self.sub_anatomies)
        if self.note:
            d["note"] = self.note
        return d


QA_KEYS = ("planarity_rms_mm", "planarity_max_mm", "plane_angle_deg", "spacing_cv", "duplicate_mm")


@dataclass(frozen=True)
class QaThresholds:
    """Limits of the annotation QA (annotation.annotation_qa); the defaults live here and only here.

    Each measure has (warn, fail) limits: a value above ``warn`` warns, above ``fail`` fails. A schema's
    optional top-level ``"qa_thresholds"`` object overrides any of them, e.g.
    ``{"planarity_rms_mm": [1, 2], "plane_angle_deg": [10, 20], "duplicate_mm": 0.5}``.
    """

    planarity_rms_mm: tuple[float, float] = (1.0, 2.0)  # RMS distance of a sub-anatomy's points to their plane
    planarity_max_mm: tuple[float, float] = (2.0, 4.0)  # the farthest point's distance to that plane
    plane_angle_deg: tuple[float, float] = (10.0, 20.0)  # that plane's tilt from the plane the schema expects
    spacing_cv: tuple[float, float] = (0.15, 0.30)  # coefficient of variation of secondary-point spacing
    duplicate_mm: float = 0.5  # two landmarks closer than this are a duplicate (fails)

    def to_dict(self) -> dict:
        values = {k: getattr(self, k) for k in QA_KEYS}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclass(frozen=True)
class Schema:
    name: str
    description: str
    sub_anatomies: tuple[SubAnatomy, ...]
    landmarks: tuple[Landmark, ...]
    source: str = ""
    planes: SchemaPlanes | None = None  # the optional "planes" declaration (see SchemaPlanes)
    qa_thresholds: QaThresholds = field(default_factory=QaThresholds)  # the optional "qa_thresholds"
    _index: dict = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.landmarks)

    @property
    def names(self) -> list[str]:
        return [lm.name for lm in self.landmarks]

    def sub_anatomy(self, name: str) -> SubAnatomy:
        return next(s for s in self.sub_anatomies if s.name == name)

    def indices_of(self, sub_anatomy: str) -> list[int]:
        return [i for i, lm in enumerate(self.landmarks) if lm.sub_anatomy == sub_anatomy]

    def lookup(self, key: str) -> int | None:
        """Index of the landmark called ``key`` (name, alias, or number as text), or None."""
        if not self._index:
            for i, lm in enumerate(self.landmarks):
                self._index.setdefault(str(lm.number), i)
            for i, lm in enumerate(self.landmarks):  # names and aliases win over numbers
                for k in (lm.name, *lm.aliases):
                    self._index[k.strip().lower()] = i
        return self._index.get(str(key).strip().lower())

    def fits(self, labels) -> bool:
        """Whether every label names one of this schema's landmarks."""
        return all(self.lookup(label) is not None for label in labels)

    def select(self, text: str) -> list[int]:
        """Landmark indices from 'all', a sub-anatomy name, or comma-separated landmark names/aliases."""
        if text == "all":
            return list(range(len(self)))
        if any(s.name == text for s in self.sub_anatomies):
            return self.indices_of(text)
        chosen = []
        for name in text.split(","):
            index = self.lookup(name)
            if index is None:
                raise LandmarkError(None, f"--landmarks: '{name}' is neither a landmark nor a sub-anatomy of schema "
                                          f"'{self.name}'")
            chosen.append(index)
        return chosen

    def mirror_indices(self) -> list[int]:
        """For each landmark, the index of its left-right counterpart (itself on the midline): the
        relabelling a left-right flip of the head needs."""
        return [self.names.index(lm.mirror) if lm.mirror else i for i, lm in enumerate(self.landmarks)]

    def rater_covariance(self) -> np.ndarray:
        """(K, 3, 3) mm^2: each landmark's rater spread (``rater_sd_mm``) as an isotropic covariance."""
        return np.array([lm.rater_sd_mm ** 2 for lm in self.landmarks])[:, None, None] * np.eye(3)

    def to_dict(self) -> dict:
        def landmark(lm: Landmark) -> dict:
            d = {"number": lm.number, "name": lm.name, "sub_anatomy": lm.sub_anatomy, "role": lm.role,
                 "definition": lm.definition}
            if lm.between:
                d["between"], d["fraction"] = list(lm.between), lm.fraction
            if lm.aliases:
                d["aliases"] = list(lm.aliases)
            if lm.mirror:
                d["mirror"] = lm.mirror
            if lm.rater_sd_mm:
                d["rater_sd_mm"] = lm.rater_sd_mm
            return d

        def sub_anatomy(s: SubAnatomy) -> dict:
            d = {"name": s.name, "plane": s.plane, "color": s.color, "guideline": s.guideline,
                 "plane_definition": s.plane_definition}
            if s.reference_rule:
                d["reference_rule"] = s.reference_rule
            return d

        d = {
            "format": "landmark-schema", "version": 1, "name": self.name, "description": self.description,
            "sub_anatomies": [sub_anatomy(s) for s in self.sub_anatomies],
            "landmarks": [landmark(lm) for lm in self.landmarks],
        }
        if self.planes is not None:
            d["planes"] = self.planes.to_dict()
        if self.qa_thresholds != QaThresholds():
            d["qa_thresholds"] = self.qa_thresholds.to_dict()
        return d


def builtin_schemas() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in (resources_dir() / "Schemas").glob("*.json"))


def load_schema(name_or_path: str | Path = DEFAULT_SCHEMA) -> Schema:
    """A built-in schema by name, or a user schema file by path."""
    text = str(name_or_path)
    path = Path(text)
    if not path.suffix and not path.exists():
        path = resources_dir() / "Schemas" / f"{text}.json"
        if not path.exists():
            raise LandmarkError(text, f"no such schema; built-in schemas are {', '.join(builtin_schemas())}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LandmarkError(path, "schema file does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LandmarkError(path, f"not a readable JSON schema ({error})") from None
    return schema_from_dict(data, source=str(path))


def schemas_fitting(labels) -> list[str]:
    """The built-in schemas whose landmarks all ``labels`` name."""
    return [name for name in builtin_schemas() if load_schema(name).fits(labels)]


def schema_of_labels(landmarks_path: str | Path) -> Schema:
    """The one built-in schema whose landmarks a landmark file holds, read by its labels (the default
    when a command reading labels is given no --schema)."""
    from .fileio import read_landmarks

    matches = []
    for name in builtin_schemas():
        schema = load_schema(name)
        try:
            read_landmarks(landmarks_path, schema)
        except LandmarkError:
            continue
        matches.append(schema)
    if len(matches) != 1:
        found = "no" if not matches else "more than one"
        raise LandmarkError(landmarks_path, f"its labels match {found} built-in schema ({', '.join(builtin_schemas())}); "
                                            "name one with --schema")
    return matches[0]


def schema_from_dict(data: dict, source: str = "<schema>") -> Schema:
    """Validate a schema dictionary and build a Schema; every problem names the schema file."""
    try:
        return _schema_from_dict(data, source)
    except (TypeError, ValueError, AttributeError, KeyError) as error:  # wrong JSON types anywhere
        raise LandmarkError(source, f"malformed schema ({type(error).__name__}: {error})") from None


def _schema_from_dict(data: dict, source: str) -> Schema:

    def fail(problem):
        raise LandmarkError(source, problem)

    if not isinstance(data, dict) or not isinstance(data.get("landmarks"), list):
        fail("not a landmark schema (needs a 'landmarks' list)")
    if not isinstance(data.get("sub_anatomies"), list) or not data["sub_anatomies"]:
        fail("needs a non-empty 'sub_anatomies' list")
    subs = []
    for s in data["sub_anatomies"]:
        if not isinstance(s, dict) or not s.get("name"):
            fail(f"sub-anatomy without a name: {s!r}")
        if s.get("plane") not in PLANES:
            fail(f"sub-anatomy '{s['name']}' has plane {s.get('plane')!r}; expected one of {', '.join(PLANES)}")
        color = s.get("color", "#ffffff")
        if not _COLOR.match(str(color)):
            fail(f"sub-anatomy '{s['name']}' has colour {color!r}; expected #rrggbb")
        rule = s.get("reference_rule", "")
        if not isinstance(rule, str):
            fail(f"sub-anatomy '{s['name']}' has a 'reference_rule' that is not text")
        subs.append(SubAnatomy(s["name"], s["plane"], color, s.get("guideline", ""), s.get("plane_definition", ""), rule))
    sub_names = [s.name for s in subs]
    if len(set(sub_names)) != len(sub_names):
        fail(f"duplicate sub-anatomy names: {_duplicates(sub_names)}")
    if not data["landmarks"]:
        fail("schema has no landmarks")

    landmarks = []
    for position, raw in enumerate(data["landmarks"], start=1):
        if not isinstance(raw, dict) or not str(raw.get("name", "")).strip():
            fail(f"landmark {position} has no name")
        name = str(raw["name"]).strip()
        if raw.get("number") != position:
            fail(f"landmark '{name}' is number {raw.get('number')!r} but stands at position {position}; "
                 "numbers must run 1, 2, 3, ... in file order")
        if raw.get("sub_anatomy") not in sub_names:
            fail(f"landmark '{name}' names unknown sub-anatomy {raw.get('sub_anatomy')!r}")
        role = raw.get("role", "primary")
        if role not in ROLES:
            fail(f"landmark '{name}' has role {role!r}; expected primary or secondary")
        between = raw.get("between")
        fraction = raw.get("fraction")
        if role == "secondary":
            if not (isinstance(between, list) and len(between) == 2):
                fail(f"secondary landmark '{name}' must name the two primary points it lies between")
            fraction = 0.5 if fraction is None else float(fraction)
            if not 0.0 < fraction < 1.0:
                fail(f"secondary landmark '{name}' has fraction {fraction}; expected between 0 and 1")
        rater_sd = raw.get("rater_sd_mm", 0.0)
        if isinstance(rater_sd, bool) or not isinstance(rater_sd, (int, float)) or not 0 <= rater_sd <= MAX_RATER_SD_MM:
            fail(f"landmark '{name}' has rater_sd_mm {rater_sd!r}; expected a number of 0 to {MAX_RATER_SD_MM:g} mm")
        landmarks.append(Landmark(position, name, raw["sub_anatomy"], role, raw.get("definition", ""),
                                  tuple(between) if between else None, fraction,
                                  tuple(str(a) for a in raw.get("aliases", ())),
                                  str(raw["mirror"]) if raw.get("mirror") else None, float(rater_sd)))

    names = [lm.name for lm in landmarks]
    if len(set(n.lower() for n in names)) != len(names):
        fail(f"duplicate landmark names: {_duplicates([n.lower() for n in names])}")
    by_name = {lm.name: lm for lm in landmarks}
    for lm in landmarks:
        if lm.between:
            for end in lm.between:
                if end not in by_name:
                    fail(f"secondary landmark '{lm.name}' lies between unknown landmark '{end}'")
                if by_name[end].role != "primary" or by_name[end].sub_anatomy != lm.sub_anatomy:
                    fail(f"secondary landmark '{lm.name}' must lie between primary points of its own sub-anatomy; "
                         f"'{end}' is not one")
    for lm in landmarks:
        if lm.mirror and (lm.mirror not in by_name or by_name[lm.mirror].mirror != lm.name):
            fail(f"landmark '{lm.name}' has mirror '{lm.mirror}', which must be a landmark naming '{lm.name}' "
                 "as its own mirror")
    keys = {}
    for lm in landmarks:
        for key in {lm.name.lower(), *(a.lower() for a in lm.aliases)}:
            if keys.setdefault(key, lm.name) != lm.name:
                fail(f"alias '{key}' is used by both '{keys[key]}' and '{lm.name}'")
    planes = _parse_planes(data["planes"], landmarks, sub_names, fail) if "planes" in data else None
    qa = _parse_qa_thresholds(data["qa_thresholds"], fail) if "qa_thresholds" in data else QaThresholds()
    return Schema(str(data.get("name") or Path(source).stem), str(data.get("description", "")),
                  tuple(subs), tuple(landmarks), source, planes, qa)


def _parse_qa_thresholds(raw, fail) -> QaThresholds:
    """Validate "qa_thresholds": [warn, fail] pairs (0 <= warn <= fail) and a duplicate_mm >= 0."""
    if not isinstance(raw, dict):
        fail("'qa_thresholds' must be an object like {\"planarity_rms_mm\": [1, 2], \"duplicate_mm\": 0.5}")
    unknown = [k for k in raw if k not in QA_KEYS]
    if unknown:
        fail(f"'qa_thresholds' has unknown key(s) {', '.join(map(repr, unknown))}; expected {', '.join(QA_KEYS)}")
    values = {}
    for key, value in raw.items():
        if key == "duplicate_mm":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                fail(f"'qa_thresholds' 'duplicate_mm' must be a distance >= 0 mm, got {value!r}")
            values[key] = float(value)
            continue
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                or not 0 <= value[0] <= value[1] < float("inf")):
            fail(f"'qa_thresholds' '{key}' must be [warn, fail] with 0 <= warn <= fail, got {value!r}")
        values[key] = (float(value[0]), float(value[1]))
    return QaThresholds(**values)


def _parse_planes(raw, landmarks, sub_names, fail) -> SchemaPlanes:
    """Validate the "planes" object; every landmark it names must be in the schema (name or alias)."""
    if not isinstance(raw, dict):
        fail("'planes' must be an object like {\"mid-sagittal\": {\"landmarks\": [...]}, \"ac\": \"AC\", "
             "\"pc\": \"PC\"}")
    unknown = [k for k in raw if k not in PLANE_KEYS]
    if unknown:
        fail(f"'planes' has unknown key(s) {', '.join(map(repr, unknown))}; expected {', '.join(PLANE_KEYS)}")
    canonical = {}
    for lm in landmarks:
        for key in (lm.name, *lm.aliases):
            canonical[key.strip().lower()] = lm.name

    def landmark(value, where):
        name = canonical.get(str(value).strip().lower()) if isinstance(value, str) else None
        if name is None:
            fail(f"'planes' {where} names unknown landmark {value!r}")
        return name

    def plane(key):
        entry = raw.get(key)
        if entry is None:
            return ()
        if not isinstance(entry, dict) or not isinstance(entry.get("landmarks"), list) or set(entry) - {"landmarks"}:
            fail(f"'planes' '{key}' must be an object {{\"landmarks\": [names...]}}")
        names = [landmark(v, f"'{key}'") for v in entry["landmarks"]]
        if len(set(names)) != len(names):
            fail(f"'planes' '{key}' names a landmark twice: {_duplicates(names)}")
        if len(names) < 3:
            fail(f"'planes' '{key}' needs at least 3 landmarks to define a plane, got {len(names)}")
        return tuple(names)

    ac = landmark(raw["ac"], "'ac'") if raw.get("ac") is not None else None
    pc = landmark(raw["pc"], "'pc'") if raw.get("pc") is not None else None
    if (ac is None) != (pc is None):
        fail("'planes' must name both 'ac' and 'pc' (an AC-PC frame needs both) or neither")
    if ac is not None and ac == pc:
        fail(f"'planes' 'ac' and 'pc' are the same landmark '{ac}'")
    anterior = raw.get("anterior")
    if anterior is not None:
        if not isinstance(anterior, dict) or set(anterior) != {"from", "to"}:
            fail("'planes' 'anterior' must be an object {\"from\": posterior landmark, \"to\": anterior landmark}")
        anterior = (landmark(anterior["from"], "'anterior'"), landmark(anterior["to"], "'anterior'"))
        if anterior[0] == anterior[1]:
            fail(f"'planes' 'anterior' runs from '{anterior[0]}' to itself")
    subs = raw.get("sub_anatomies")
    if subs is not None:
        if not isinstance(subs, list):
            fail("'planes' 'sub_anatomies' must be a list of sub-anatomy names")
        for name in subs:
            if name not in sub_names:
                fail(f"'planes' 'sub_anatomies' names unknown sub-anatomy {name!r}")
        subs = tuple(subs)
    note = raw.get("note", "")
    if not isinstance(note, str):
        fail("'planes' 'note' must be text")
    return SchemaPlanes(plane("mid-sagittal"), plane("axial"), ac, pc, anterior, subs, note)


def _duplicates(items):
    seen, dup = set(), []
    for item in items:
        if item in seen and item not in dup:
            dup.append(item)
        seen.add(item)
    return ", ".join(dup)
