"""End to end on real anatomy: the MNI152NLin2009cAsym template and its human AFIDs-32 consensus
(autoafids 0.1.4 wheel). A small model trained on rigidly moved copies must find the AFIDs on a copy
moved by an unseen motion better than the obvious baseline, the mean training position."""

import numpy as np

from LandmarkDetectionLib.cli import main
from LandmarkDetectionLib.geometry import apply_matrix
from LandmarkDetectionLib.fileio import read_landmarks
from LandmarkDetectionLib.metrics import radial_errors
from LandmarkDetectionLib.train import TrainOptions, train
from conftest import moved_copies


def test_small_model_beats_the_training_mean_on_an_unseen_motion(afids_small, afids32, tmp_path):
    image, landmarks = afids_small
    train_motions = moved_copies(image, landmarks, afids32, tmp_path / "train", 16, seed=11)
    test_motion = moved_copies(image, landmarks, afids32, tmp_path / "test", 1, seed=999, prefix="unseen")[0]
    assert not any(np.allclose(test_motion, m) for m in train_motions)

    model = train(TrainOptions(dataset=str(tmp_path / "train"), output=str(tmp_path / "run"), schema="afids-32",
                               channels=(8, 12, 16), blocks_per_stage=1, dropout=0.0, size=(40, 48, 40),
                               spacing=(4.5, 4.5, 4.5), epochs=6, lr=3e-3, sigma_mm=6.0, val_fraction=0.125,
                               patience=10, seed=0, progress="none"))
    assert main(["detect", "--model", str(model), "--input", str(tmp_path / "test"), "--output",
                 str(tmp_path / "pred"), "--progress", "none"]) == 0
    predicted = read_landmarks(tmp_path / "pred" / "unseen00.mrk.json", afids32)
    truth = apply_matrix(test_motion, landmarks)
    model_mre = radial_errors(predicted, truth).mean()
    training_mean = np.mean([apply_matrix(m, landmarks) for m in train_motions], axis=0)
    baseline_mre = radial_errors(training_mean, truth).mean()
    print(f"model MRE {model_mre:.2f} mm, training-mean baseline {baseline_mre:.2f} mm")
    assert model_mre < 0.6 * baseline_mre
