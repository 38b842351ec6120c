"""The README's promises on user input: landmark labels, coordinate columns, devices, schema hints."""

from __future__ import annotations

import numpy as np
import pytest

from LandmarkDetectionLib.cli import main
from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.fileio import read_landmarks, write_markups_json
from LandmarkDetectionLib.runtime import pick_device
from LandmarkDetectionLib.schema import load_schema, schema_of_labels


def test_labels_that_are_landmark_numbers_match(tmp_path, afids32):
    rows = "".join(f"{n},{n}.0,{-n}.5,{2 * n}\n" for n in range(32, 0, -1))  # numbers, in another order
    (tmp_path / "numbers.csv").write_text("label,x,y,z\n" + rows)
    coords = read_landmarks(tmp_path / "numbers.csv", afids32)
    assert coords[0].tolist() == [1.0, -1.5, 2.0] and coords[31].tolist() == [32.0, -32.5, 64.0]


def test_a_csv_with_both_ras_and_lps_columns_is_refused(tmp_path, afids32):
    path = tmp_path / "both.csv"
    path.write_text("name,x,y,z,l,p,s\n" + "".join(f"{lm.name},1,2,3,-1,-2,3\n" for lm in afids32.landmarks))
    with pytest.raises(LandmarkError, match="both LPS .* and RAS"):
        read_landmarks(path, afids32)


def test_labels_of_another_schema_name_the_schema_that_fits(tmp_path, afids32, brain88):
    path = tmp_path / "afids.mrk.json"
    write_markups_json(path, afids32, np.zeros((32, 3)))
    with pytest.raises(LandmarkError, match="fit schema 'afids-32' \\(pass --schema afids-32\\)"):
        read_landmarks(path, brain88)
    assert schema_of_labels(path).name == "afids-32"


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu:0", "cuda:7"])
def test_an_unknown_or_absent_device_is_one_line(device, capsys, tmp_path):
    with pytest.raises(ValueError, match=f"--device {device}"):
        pick_device(device)
    assert main(["detect", "--model", "none.safetensors", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--device", device]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: --device {device}") and error.count("\n") == 1


def test_builtin_schemas_number_their_landmarks_in_order():
    for name in ("afids-32", "brain-88"):
        schema = load_schema(name)
        assert [schema.lookup(str(n)) for n in range(1, len(schema) + 1)] == list(range(len(schema)))
