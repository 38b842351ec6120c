"""Static checks of the Slicer modules (they need the Slicer application to run) and the headless batch
script run as a plain Python program."""

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from conftest import REPO

MODULES = [path.parent for path in REPO.glob("*/CMakeLists.txt") if (path.parent / f"{path.parent.name}.py").exists()]


def _ui(module_dir):
    return ET.parse(module_dir / "Resources" / "UI" / f"{module_dir.name}.ui").getroot()


def _parameter_fields(tree) -> set[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
                getattr(d, "id", getattr(d, "attr", "")) == "parameterNodeWrapper" for d in node.decorator_list):
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    return set()


def test_there_are_modules():
    assert {m.name for m in MODULES} >= {"LandmarkDetection"}


@pytest.mark.parametrize("module_dir", MODULES, ids=lambda m: m.name)
def test_widget_names_and_parameter_names_match_the_ui(module_dir):
    root = _ui(module_dir)
    widgets = {w.get("name") for w in root.iter("widget")}
    source = (module_dir / f"{module_dir.name}.py").read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the module uses no widgets?"
    assert used <= widgets, f"used in code but not in the .ui: {sorted(used - widgets)}"
    bound = {p.find("string").text for p in root.iter("property") if p.get("name") == "SlicerParameterName"}
    fields = _parameter_fields(ast.parse(source))
    assert bound and bound <= fields, f"SlicerParameterName without a parameter: {sorted(bound - fields)}"


@pytest.mark.parametrize("module_dir", MODULES, ids=lambda m: m.name)
def test_every_python_file_and_resource_is_listed_in_cmake(module_dir):
    cmake = (module_dir / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", module_dir.name)
    for path in module_dir.rglob("*"):
        if "__pycache__" in path.parts or path.is_dir() or path.name == "CMakeLists.txt":
            continue
        if path.suffix in (".py", ".ui", ".png"):
            assert str(path.relative_to(module_dir)) in cmake, f"{path} is not listed in {module_dir}/CMakeLists.txt"


def _slicer_python_files():
    return [p for folder in MODULES for p in folder.rglob("*.py") if "__pycache__" not in p.parts]


def _unions_in_annotations(tree) -> bool:
    annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.arg, ast.AnnAssign)) and n.annotation]
    annotations += [n.returns for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.returns]
    return any(isinstance(b, ast.BinOp) and isinstance(b.op, ast.BitOr) for a in annotations for b in ast.walk(a))


def test_code_slicer_loads_runs_on_python_3_9():
    """Slicer 5.6 and 5.8 bundle Python 3.9: every file Slicer loads parses as 3.9, and a file that writes
    ``X | None`` in annotations defers them (``from __future__ import annotations``), or 3.9 fails at import."""
    files = _slicer_python_files()
    assert len(files) > 40
    for path in files:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, str(path), feature_version=(3, 9))
        if _unions_in_annotations(tree):
            assert "from __future__ import annotations" in source, f"{path}: X | Y annotations need the future import"


def test_extension_cmake_names_every_module_and_depends_on_pytorch():
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in cmake
    for module_dir in MODULES:
        assert f"add_subdirectory({module_dir.name})" in cmake
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert f"set({key} " in cmake


def test_backend_never_imports_qt_or_the_slicer_application():
    for path in (REPO / "LandmarkDetection" / "LandmarkDetectionLib").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import qt|import ctk|from qt )", text, re.M), path
        assert "slicer.app" not in text, path


def test_batch_script_one_line_per_volume_and_exit_code(tiny_dataset, tmp_path):
    import shutil

    import numpy as np
    import SimpleITK as sitk

    from LandmarkDetectionLib.train import TrainOptions, train
    from conftest import TINY_TRAIN

    model = train(TrainOptions(dataset=str(tiny_dataset), output=str(tmp_path / "run"), epochs=1, **TINY_TRAIN))
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("case00", "case01"):
        shutil.copy(tiny_dataset / f"{name}.nii.gz", folder / f"{name}.nii.gz")
    script = REPO / "LandmarkDetection" / "Scripts" / "batch_detect.py"
    ok = subprocess.run([sys.executable, str(script), "--input", str(folder), "--output", str(tmp_path / "out"),
                         "--model", str(model), "--uncertainty", "4"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["ok", "ok"] and "2 of 2 volume(s) succeeded" in lines[-1]
    assert (tmp_path / "out" / "case01.uncertainty.json").exists()

    array = np.zeros((8, 9, 10), np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / "empty.nii.gz"))
    bad = subprocess.run([sys.executable, str(script), "--input", str(folder), "--output", str(tmp_path / "out2"),
                          "--model", str(model)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "FAILED empty.nii.gz" in bad.stdout and "2 of 3 volume(s) succeeded" in bad.stdout
    assert (tmp_path / "out2" / "case00.mrk.json").exists() and (tmp_path / "out2" / "case01.mrk.json").exists()


def test_every_resource_the_backend_reads_is_copied_into_the_build_tree():
    """Schemas, settings, the sample manifest, requirements and bundled models: listed one by one in the
    extension's CMake, which copies them beside the backend in the build tree and installs them."""
    from LandmarkDetectionLib.resources import BUNDLED_MODELS

    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\s+(Resources/\S+)$", cmake, flags=re.MULTILINE))
    read = {f"Resources/{p.relative_to(REPO / 'Resources')}" for pattern in ("Schemas/*.json", "Augmentation/*.json")
            for p in (REPO / "Resources").glob(pattern)}
    read |= {"Resources/SampleData.json", "Resources/requirements.txt"}
    read |= {f"Resources/{path}" for path in BUNDLED_MODELS.values()}
    assert read <= listed, f"read by the backend but not copied by CMake: {sorted(read - listed)}"
    assert all((REPO / path).is_file() for path in listed)
    assert "configure_file(${resource}" in cmake  # copied into the build tree, not only installed


def test_pip_receives_a_list_of_arguments_so_windows_paths_survive():
    sys.path.insert(0, str(REPO / "LandmarkDetection"))
    from LandmarkDetectionAppLib.dependencies import pip_arguments
    from pathlib import PureWindowsPath

    arguments = pip_arguments(PureWindowsPath(r"C:\Users\me\Slicer\requirements.txt"),
                              PureWindowsPath(r"C:\Temp\x-constraints.txt"))
    assert type(arguments) is list  # slicer.util.pip_install accepts exactly a list (a tuple raises)
    assert arguments == ["-r", r"C:\Users\me\Slicer\requirements.txt", "-c", r"C:\Temp\x-constraints.txt"]
    source = (REPO / "LandmarkDetection" / "LandmarkDetectionAppLib" / "dependencies.py").read_text(encoding="utf-8")
    assert "import slicer.packaging" in source and "prompt_install=False" in source
    assert "invalidate_caches()" in source


def test_the_model_header_is_read_without_torch():
    """The Slicer modules list a model's landmarks before torch is installed."""
    code = ("import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
            "from LandmarkDetectionLib.modelheader import read_header\n"
            "from LandmarkDetectionLib.resources import bundled_model_path\n"
            "header = read_header(bundled_model_path())\n"
            "print(header.schema['name'], len(header.schema['landmarks']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO / "LandmarkDetection"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["afids-32", "32"]


def test_module_files_use_the_shared_app_layer_only():
    """No copy of the process or dependency code in the module files."""
    for module_dir in MODULES:
        source = (module_dir / f"{module_dir.name}.py").read_text(encoding="utf-8")
        assert "QProcess" not in source and "pip_install" not in source and "mkdtemp" not in source
        assert ".connectGui(" not in source  # returns no tag before Slicer 5.10


def test_sample_data_registration_imports_no_simpleitk_or_torch():
    """Slicer registers the sample at every start: reading the manifest must stay light."""
    code = ("import sys\nfrom LandmarkDetectionLib.sample_data import cache_dir, manifest\n"
            "manifest(); cache_dir()\nprint(sorted(m for m in ('SimpleITK', 'torch', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO / "LandmarkDetection"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
