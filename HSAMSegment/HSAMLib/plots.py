"""Live training curves: a table node (epoch, loss, validation Dice) shown by a plot chart node."""

import math
from typing import Optional

import vtk

COLUMNS = ("epoch", "loss", "val_dice")


class TrainingCurves:
    """Table + plot series + chart nodes for one training run."""

    def __init__(self, scene, name: str = "HSAM training"):
        self.scene = scene
        self.tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{name} table"))
        table = self.tableNode.GetTable()
        for column in COLUMNS:
            array = vtk.vtkDoubleArray()
            array.SetName(column)
            table.AddColumn(array)
        self.chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(name))
        self.chartNode.SetTitle(name)
        self.chartNode.SetXAxisTitle("epoch")
        self.chartNode.SetYAxisTitle("loss / Dice")
        for column, color in (("loss", (0.85, 0.3, 0.2)), ("val_dice", (0.2, 0.5, 0.85))):
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{name} {column}"))
            series.SetAndObserveTableNodeID(self.tableNode.GetID())
            series.SetXColumnName("epoch")
            series.SetYColumnName(column)
            series.SetPlotType(series.PlotTypeScatter)
            series.SetColor(*color)
            self.chartNode.AddAndObservePlotSeriesNodeID(series.GetID())

    def remove(self) -> None:
        """Take the chart, its series and the table out of the scene."""
        for index in reversed(range(self.chartNode.GetNumberOfPlotSeriesNodes())):
            self.scene.RemoveNode(self.chartNode.GetNthPlotSeriesNode(index))
        self.scene.RemoveNode(self.chartNode)
        self.scene.RemoveNode(self.tableNode)

    def append(self, epoch: float, loss: float, val_dice: Optional[float] = None) -> None:
        """Add one point; a missing validation Dice is stored as NaN (a gap in the curve)."""
        table = self.tableNode.GetTable()
        row = table.InsertNextBlankRow()
        values = (epoch, loss, math.nan if val_dice is None else val_dice)
        for column, value in zip(COLUMNS, values):
            table.SetValue(row, table.GetColumnIndex(column), vtk.vtkVariant(float(value)))
        table.Modified()
        self.tableNode.Modified()

    def rows(self) -> list[tuple[float, float, float]]:
        table = self.tableNode.GetTable()
        return [
            tuple(table.GetValue(row, table.GetColumnIndex(c)).ToDouble() for c in COLUMNS)
            for row in range(table.GetNumberOfRows())
        ]
