import json

import numpy as np
import pytest

from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.schema import builtin_schemas, load_schema, schema_from_dict

PAPER_RANGES = {"Frontal Lobe": (1, 5), "Brain Stem": (6, 13), "Brain Boundary MSP": (14, 24),
                "Corpus Callosum": (25, 37), "Eye": (38, 45), "Brain Axial Boundary": (46, 55),
                "Temporal Lobe": (56, 88)}


def test_builtin_schemas_are_listed():
    assert {"brain-88", "afids-32"} <= set(builtin_schemas())


def test_brain88_follows_the_papers_numbering(brain88):
    assert len(brain88) == 88
    assert [s.name for s in brain88.sub_anatomies] == list(PAPER_RANGES)
    for name, (first, last) in PAPER_RANGES.items():
        assert [brain88.landmarks[i].number for i in brain88.indices_of(name)] == list(range(first, last + 1))
    for lm in brain88.landmarks:
        assert lm.definition, lm.name
        assert lm.role in ("primary", "secondary")
    for sub in brain88.sub_anatomies:
        assert sub.guideline and sub.plane in ("mid-sagittal", "sagittal", "axial", "coronal", "oblique")
        assert len(sub.rgb) == 3


def test_brain88_secondary_points_lie_between_primaries_of_their_sub_anatomy(brain88):
    by_name = {lm.name: lm for lm in brain88.landmarks}
    secondaries = [lm for lm in brain88.landmarks if lm.role == "secondary"]
    assert len(secondaries) > 20
    for lm in secondaries:
        a, b = (by_name[n] for n in lm.between)
        assert a.role == b.role == "primary" and a.sub_anatomy == b.sub_anatomy == lm.sub_anatomy
        assert 0 < lm.fraction < 1


def test_afids32_published_order(afids32):
    assert afids32.names[:5] == ["AC", "PC", "ICS", "PMJ", "SIPF"]
    assert afids32.names[-2:] == ["ROSF", "LOSF"]
    assert afids32.lookup("genu of CC") == afids32.names.index("GENU")
    assert afids32.lookup("anterior commissure") == 0


def _write(tmp_path, data):
    path = tmp_path / "user.json"
    path.write_text(json.dumps(data))
    return path


def _valid():
    return {"name": "mini", "sub_anatomies": [{"name": "A", "plane": "axial", "color": "#ff0000"}],
            "landmarks": [{"number": 1, "name": "p1", "sub_anatomy": "A", "role": "primary"},
                          {"number": 2, "name": "p2", "sub_anatomy": "A", "role": "primary"},
                          {"number": 3, "name": "s1", "sub_anatomy": "A", "role": "secondary",
                           "between": ["p1", "p2"], "fraction": 0.5}]}


def test_user_schema_loads(tmp_path):
    schema = load_schema(_write(tmp_path, _valid()))
    assert schema.names == ["p1", "p2", "s1"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["landmarks"][1].update(name="P1"), "duplicate landmark names"),
    (lambda d: d["landmarks"][1].update(number=5), "numbers must run"),
    (lambda d: d["landmarks"][0].update(sub_anatomy="Nowhere"), "unknown sub-anatomy"),
    (lambda d: d["landmarks"][2].update(between=["p1", "nope"]), "unknown landmark 'nope'"),
    (lambda d: d["landmarks"][2].update(between=["p1", "s1"]), "primary points"),
    (lambda d: d["sub_anatomies"][0].update(plane="diagonal"), "plane"),
    (lambda d: d["landmarks"][0].update(role="tertiary"), "role"),
    (lambda d: d["landmarks"][0].update(rater_sd_mm=-0.5), "rater_sd_mm"),
    (lambda d: d["landmarks"][0].update(rater_sd_mm="wide"), "rater_sd_mm"),
    (lambda d: d["landmarks"][0].update(rater_sd_mm=True), "rater_sd_mm"),
])
def test_bad_user_schema_is_refused_with_the_file_named(tmp_path, change, message):
    data = _valid()
    change(data)
    path = _write(tmp_path, data)
    with pytest.raises(LandmarkError, match=message) as error:
        load_schema(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_unknown_schema_name():
    with pytest.raises(LandmarkError, match="no such schema"):
        load_schema("brain-99")


def test_afids_carries_the_raters_spread_and_a_user_schema_may_set_it(tmp_path):
    """afids-32: every landmark's rater spread from the AFIDs multi-rater study (AC 0.25 mm per axis, the
    inferior AM-temporal horns the widest); brain-88 has no such study (0). A user schema's value survives
    the round trip through a model file's copy (to_dict)."""
    afids = load_schema("afids-32")
    spread = {lm.name: lm.rater_sd_mm for lm in afids.landmarks}
    assert spread["AC"] == 0.25 and max(spread, key=spread.get) == "RIAMTH"
    assert all(0.2 <= v <= 1.0 for v in spread.values())
    assert not load_schema("brain-88").rater_covariance().any()
    data = _valid()
    data["landmarks"][0]["rater_sd_mm"] = 0.8
    schema = load_schema(_write(tmp_path, data))
    assert np.allclose(schema.rater_covariance()[0], 0.64 * np.eye(3)) and not schema.rater_covariance()[1].any()
    assert schema_from_dict(schema.to_dict()).landmarks[0].rater_sd_mm == 0.8
