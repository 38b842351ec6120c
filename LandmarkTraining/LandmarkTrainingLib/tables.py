"""Table nodes of text: the QA table and the agreement CSVs (MRML only, no Qt)."""

from __future__ import annotations

import csv
from pathlib import Path

import vtk

from LandmarkDetectionLib.errors import LandmarkError


def fill_table(table_node, header, rows) -> None:
    """Replace a table node's contents by text columns ``header`` and ``rows`` (lists of cells)."""
    table_node.RemoveAllColumns()
    for k, title in enumerate(header):
        column = vtk.vtkStringArray()
        column.SetName(str(title))
        for row in rows:
            column.InsertNextValue(str(row[k]) if k < len(row) else "")
        table_node.AddColumn(column)
    # column names as the view's header, so view rows are table rows (the setter was renamed in Slicer 5.8)
    (getattr(table_node, "SetUseColumnTitleAsColumnHeader", None) or table_node.SetUseColumnNameAsColumnHeader)(True)
    table_node.SetLocked(True)  # shown, not edited
    table_node.Modified()


def table_from_csv(scene, path: Path, name: str | None = None):
    """A new table node holding a CSV file's cells as text (header row as column names)."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise LandmarkError(path, f"not a readable CSV file ({error})") from None
    if not rows:
        raise LandmarkError(path, "CSV file is empty")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name or path.stem)
    fill_table(table, rows[0], rows[1:])
    return table
